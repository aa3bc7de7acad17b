"""Training: the steps every method shares (skeleton.py), and one module per method on them (sft.py, dpo.py)."""
