"""glmtune serve: an OpenAI-compatible HTTP API over the inference engine (see app.py)."""
