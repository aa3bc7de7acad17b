"""Models: finding and loading checkpoints, their tokenizers and stop tokens; LoRA targets; tiny demo models."""
