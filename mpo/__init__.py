"""internvl-mpo: Mixed Preference Optimization for InternVL vision-language models."""

__version__ = "0.1.0"
