"""Image generators: FLUX.1-dev with the character LoRA."""
