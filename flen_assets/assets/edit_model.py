"""The edit-model flywheel: accepted (before, prompt, after) triplets and the Qwen-Image-Edit adapter."""
