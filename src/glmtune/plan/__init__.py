"""glmtune plan: a LoRA run's peak memory from the model's config.json alone (shape, memory, device)."""
