"""Model loading, tiny test models, formats, freezing and LoRA."""
