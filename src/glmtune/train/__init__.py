"""Training: LoRA supervised fine-tuning on transformers' Trainer."""
