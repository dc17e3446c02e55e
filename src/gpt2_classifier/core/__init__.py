"""The small core every stage shares: params.yaml's schema, the pipeline's paths, atomic files,
one error type, the stage runner, and GPT-2's architecture as a dataclass. No torch."""
