"""cotune: serve thousands of LoRA adapters and fine-tune new ones in the same forward pass."""
