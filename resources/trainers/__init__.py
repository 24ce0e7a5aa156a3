"""LoRA trainers (FLUX.1-dev on training sets, Qwen-Image-Edit on edit triplets) and their shared parts."""
