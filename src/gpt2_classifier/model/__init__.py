"""GPT-2 and the classifier made of it: the model (gpt), its published checkpoints (pretrained,
tensorfile), loading and saving weights, LoRA adapters, the classification head."""
