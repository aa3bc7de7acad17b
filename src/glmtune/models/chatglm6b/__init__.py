"""ChatGLM-6B (THUDM/chatglm-6b, the first ChatGLM) as a native transformers model: THUDM's parameter names, no remote
code. `register()` makes AutoConfig / AutoModel / AutoModelForCausalLM know `model_type: chatglm6b`."""

from __future__ import annotations


def register() -> None:
    """Register ChatGlm6bConfig and its models with transformers' Auto classes; safe to call more than once."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from glmtune.models.chatglm6b.configuration import ChatGlm6bConfig
    from glmtune.models.chatglm6b.modeling import ChatGlm6bForCausalLM, ChatGlm6bModel

    AutoConfig.register(ChatGlm6bConfig.model_type, ChatGlm6bConfig, exist_ok=True)
    AutoModel.register(ChatGlm6bConfig, ChatGlm6bModel, exist_ok=True)
    AutoModelForCausalLM.register(ChatGlm6bConfig, ChatGlm6bForCausalLM, exist_ok=True)
