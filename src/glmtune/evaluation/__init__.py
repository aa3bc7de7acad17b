"""Generation-based evaluation: metrics, the evaluation run over a dataset, and train's per-checkpoint hook."""
