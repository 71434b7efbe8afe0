"""Checkpoint conversion: PyTorch / Hugging Face / GGUF checkpoints into ltu-jax models and back."""
