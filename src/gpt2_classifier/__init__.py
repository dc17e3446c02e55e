"""Fine-tune GPT-2 into a text classifier: the library behind the DVC stages."""

__version__ = "0.1.0"
