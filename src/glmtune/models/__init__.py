"""Models: the family registry (families.py, what each GLM family is and needs); finding and loading checkpoints,
their tokenizers and stop tokens; LoRA targets; tiny demo models.

Importing this package registers glmtune's own architectures with transformers' Auto classes (ChatGLM-6B, whose
architecture transformers lacks), so that a directory written by `glmtune convert` loads with
AutoModelForCausalLM after `import glmtune.models`; unless it is first imported inside
glmtune.registration.config_only() (`glmtune plan`, which must not import torch).
"""

from glmtune import registration
from glmtune.models.chatglm6b import register

if registration.on_import:
    register()
