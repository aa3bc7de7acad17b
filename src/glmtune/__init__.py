"""glmtune: fine-tune ChatGLM / GLM chat models, and any Hugging Face causal LM, with LoRA.

Importing glmtune imports no torch: the commands import the heavy libraries when they run.
"""

__version__ = "0.1.0"
