"""The model families glmtune knows: ONE table, one entry per family, and the one place a family is described.

An entry says how a checkpoint of the family is recognised (its config.json and its directory's files), how it
loads (transformers' AutoModelForCausalLM, or a glmtune converter), how its tokenizer is built (transformers', or
glmtune's rebuild of a remote-code one, chat template included), where its turns end (stop tokens beyond the eos),
what LoRA adapts by default, how its training samples are packed, what quantization its loading takes, and how
`glmtune plan` reads its config. Loading, LoRA, batching, packed attention and plan ask `family_of(...)`; no other
module branches on model types.

Adding a family: write one `Family(...)` below and put it in FAMILIES before any entry that would also recognise
its checkpoints (the first entry that recognises one wins; ANY_CAUSAL_LM, last, takes every other causal LM).
Fields left out are those of a causal LM that transformers loads as it is. Code the family needs (a converter, a
tokenizer builder, a config reader for plan) goes in its own module, as models/chatglm/ and models/chatglm6b/ do,
and the entry points at it. Then give tests/test_families.py a representative config of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from glmtune.models.chatglm.convert import is_chatglm2_config, load_chatglm2
from glmtune.models.chatglm.glm4_tokenizer import build_glm4_tokenizer, is_glm4_tokenizer_dir
from glmtune.models.chatglm.ice_tokenizer import build_ice_tokenizer, is_ice_tokenizer_dir
from glmtune.models.chatglm.shape import native_config as thudm_native_config
from glmtune.models.chatglm.sp_tokenizer import build_chatglm_sp_tokenizer, chatglm_sp_family
from glmtune.models.chatglm6b.loading import is_chatglm6b_config, load_chatglm6b
from glmtune.models.chatglm6b.shape import MODEL_TYPE as CHATGLM6B_MODEL_TYPE
from glmtune.models.chatglm6b.shape import chatglm6b_shape
from glmtune.models.hub import local_config
from glmtune.models.quantization import QUANTIZATION_BITS
from glmtune.plan.shape import Decoder, ModelShape, llama_like

# (config.json as a dict, {} when there is none; the local directory, None for a hub name) -> is it this family?
Recogniser = Callable[[dict[str, Any], Path | None], bool]


@dataclass(frozen=True)
class Converter:
    """A checkpoint layout transformers can't load, built into a model by glmtune while loading."""

    layout: str  # how messages name the layout: "a {layout} checkpoint in THUDM's layout"
    load: Callable[[Path, dict[str, Any], Any], Any]  # (directory, config.json, dtype) -> model in eval mode


@dataclass(frozen=True)
class NativeTokenizer:
    """A tokenizer transformers loads only through remote code, rebuilt by glmtune with its chat template."""

    matches: Callable[[Path], bool]  # a tokenizer directory as the family publishes it
    build: Callable[[Path], Any]  # -> a PreTrainedTokenizerFast


@dataclass(frozen=True)
class Family:
    """One family. Its chat template is its tokenizer's: the one a NativeTokenizer builds (the official prompts,
    token for token) or the one the checkpoint ships; data/templates.py renders either."""

    name: str
    recognise: Recogniser
    converter: Converter | None = None  # None: AutoModelForCausalLM.from_pretrained
    tokenizer: NativeTokenizer | None = None  # None: AutoTokenizer.from_pretrained
    # Tokens that end a turn besides the eos ids of the generation config: chats with role tokens end a turn where
    # the next one begins, as their official chat() stops (ChatGLM3's config lists only the eos).
    end_of_turn: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] | str = "all-linear"  # module names, or peft's "all-linear"
    # Parameters LoRA adapts by default beside those modules (peft's target_parameters, matched by name suffix):
    # weights that are no nn.Linear, such as a mixture of experts' fused expert tensors.
    lora_parameters: tuple[str, ...] = ()
    router: str | None = None  # a mixture of experts' router module (name suffix): frozen unless --train_router
    # Whether restarting position ids keep packed samples apart (transformers' attention interface does; a model
    # deriving its own masks from the ids would let them see each other: padded batches then).
    packing: bool = True
    # Whether its attention is exactly softmax(QK^T * scaling + causal mask) V: no sliding window, soft-capping,
    # sinks or bias terms, so the whole batch can go in one row (train/packed_attention.py).
    plain_causal: bool = False
    shape: Callable[[dict[str, Any], str], ModelShape] | None = None  # plan's reader of its config.json
    # Trained in bf16 by its authors: its activations exceed fp16's range (NaN losses), so fp16 training is warned of.
    bf16_trained: bool = False

    @property
    def quantization_bits(self) -> tuple[int, ...]:
        """The --quantization_bit values its loading takes: transformers quantizes inside from_pretrained, which a
        converted layout doesn't go through (`glmtune convert` writes one that does)."""
        return () if self.converter else QUANTIZATION_BITS


def _model_type(*names: str) -> Recogniser:
    return lambda config, directory: config.get("model_type") in names


def _thudm(tokenizer_matches: Callable[[Path], bool], any_config: bool = False) -> Recogniser:
    """THUDM's ChatGLM2/3 and GLM-4 share one config layout and differ by tokenizer: their config (or none, for a
    tokenizer directory) beside that tokenizer's files; with `any_config`, their config alone also does."""
    def recognise(config: dict[str, Any], directory: Path | None) -> bool:
        if any_config and is_chatglm2_config(config):
            return True
        return (not config or is_chatglm2_config(config)) and directory is not None and tokenizer_matches(directory)
    return recognise


def _chatglm6b(config: dict[str, Any], directory: Path | None) -> bool:
    """THUDM's config (`chatglm` with position_encoding_2d), or its tokenizer directory."""
    return is_chatglm6b_config(config) or (not config and directory is not None and is_ice_tokenizer_dir(directory))


def _sentencepiece(generation: str) -> NativeTokenizer:
    return NativeTokenizer(matches=lambda directory: chatglm_sp_family(directory) == generation,
                           build=partial(build_chatglm_sp_tokenizer, family=generation))


GLM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
ROLE_TURN_ENDS = ("<|user|>", "<|observation|>")
GLM_DECODER = Decoder(fused_gate_up=True, qkv_bias=True, o_bias=False)

# transformers' GlmForCausalLM (GLM-4-9B-chat-hf layout). peft knows no default targets for glm/glm4 (LoraConfig(r=8)
# raises), so every linear layer of the decoder is named: attention q/k/v/o and the fused MLP.
GLM = Family("GLM-4 (transformers' glm)", _model_type("glm"), end_of_turn=ROLE_TURN_ENDS, lora_targets=GLM_LINEARS,
             plain_causal=True, shape=GLM_DECODER, bf16_trained=True)
# GLM-4-0414 / GLM-Z1, GLM-4.5 / 4.6 / 4.7: they stop on <|user|>, <|observation|> (after a tool call) and
# <|endoftext|>, named here too for a checkpoint whose generation config lists fewer. Whether a checkpoint thinks is
# its tokenizer's chat template's to say (data/templates.py: has_thinking_switch, reasoning_form), not the entry's:
# GLM-4-0414's does not, GLM-Z1's and GLM-4.5+'s do.
THINKING_GLM_TURN_ENDS = (*ROLE_TURN_ENDS, "<|endoftext|>")
# GLM-4-0414 / Z1: two more norms per layer.
GLM4 = replace(GLM, name="GLM-4-0414 / GLM-Z1 (transformers' glm4)", recognise=_model_type("glm4"),
               end_of_turn=THINKING_GLM_TURN_ENDS,
               shape=Decoder(fused_gate_up=True, norms_per_layer=4, qkv_bias=True, o_bias=False))
# GLM-4.5 / 4.6 / 4.7: LoRA on attention (modules), and on every MLP as parameters: the routed experts (transformers
# 5 keeps them fused, one 3-D tensor per projection), the shared experts and the first layers' dense MLP. The MLP
# linears are named as parameters because peft 0.21 rewrites any gate_proj/up_proj/down_proj *module* target of a
# transformers-5 MoE model into one on the fused experts, and then adapts neither the dense nor the shared-expert
# MLP (peft issue #3711); parameter targets are left as they are, when training and when loading. The router
# (mlp.gate) stays frozen unless --train_router.
GLM4_MOE_MLP_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                           "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                           "shared_experts.gate_proj.weight", "shared_experts.up_proj.weight",
                           "shared_experts.down_proj.weight")
GLM4_MOE = replace(GLM, name="GLM-4.5 / 4.6 / 4.7 (transformers' glm4_moe)", recognise=_model_type("glm4_moe"),
                   lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), lora_parameters=GLM4_MOE_MLP_PARAMETERS,
                   router="mlp.gate", shape=Decoder(o_bias=False, moe=True), end_of_turn=THINKING_GLM_TURN_ENDS)

# THUDM's remote-code checkpoints (`model_type: chatglm` with multi_query_attention), converted on load into the
# GlmForCausalLM above (models/chatglm/convert.py): after loading they are that model in everything.
THUDM_GLM = Converter("ChatGLM2/3 or GLM-4", load_chatglm2)


def _thudm_shape(config: dict[str, Any], source: str = "config.json") -> ModelShape:
    return GLM_DECODER(thudm_native_config(config, source), source)


GLM4_9B_CHAT = replace(GLM, name="GLM-4-9B-chat (THUDM's layout)", recognise=_thudm(is_glm4_tokenizer_dir),
                       converter=THUDM_GLM, tokenizer=NativeTokenizer(is_glm4_tokenizer_dir, build_glm4_tokenizer),
                       shape=_thudm_shape)
CHATGLM3_TOKENIZER, CHATGLM2_TOKENIZER = _sentencepiece("chatglm3"), _sentencepiece("chatglm2")
# ChatGLM2/3 were released to run in fp16 (their official code calls .half()).
CHATGLM3 = replace(GLM4_9B_CHAT, name="ChatGLM3-6B", recognise=_thudm(CHATGLM3_TOKENIZER.matches),
                   tokenizer=CHATGLM3_TOKENIZER, bf16_trained=False)
# Also every other THUDM ChatGLM2/3 or GLM-4 config (one without its tokenizer files): the three load alike, and
# its turns may end on role tokens (ChatGLM2's own vocabulary has none, so they add no stop id to it).
CHATGLM2 = replace(CHATGLM3, name="ChatGLM2-6B", recognise=_thudm(CHATGLM2_TOKENIZER.matches, any_config=True),
                   tokenizer=CHATGLM2_TOKENIZER)

# The first ChatGLM-6B: an architecture transformers lacks, glmtune's own class (models/chatglm6b/). It derives its
# prefix mask from the ids, so packed samples would see each other. LoRA on the fused attention projection, as
# THUDM's own LoRA recipes and the seed did.
CHATGLM6B = Family("ChatGLM-6B (THUDM's layout)", _chatglm6b, converter=Converter("ChatGLM-6B", load_chatglm6b),
                   tokenizer=NativeTokenizer(is_ice_tokenizer_dir, build_ice_tokenizer),
                   lora_targets=("query_key_value",), packing=False, shape=chatglm6b_shape)
# What `glmtune convert` writes of it (and what it loads as): the same class through the Auto classes.
CHATGLM6B_CONVERTED = replace(CHATGLM6B, name="ChatGLM-6B (glmtune's class)",
                              recognise=_model_type(CHATGLM6B_MODEL_TYPE), converter=None)

# Not GLM: transformers' decoders whose attention is plain causal attention (one-row packing applies).
# They stop on the role tokens too where their vocabulary has them (Phi-3's chat template marks turns with
# <|user|>): a turn ends where the next one begins. A vocabulary without them gets no extra stop id.
LLAMA_STYLE = Family("Llama-style decoders", _model_type("llama", "mistral", "qwen2", "qwen3", "qwen3_moe"),
                     end_of_turn=ROLE_TURN_ENDS, plain_causal=True, shape=llama_like)
ANY_CAUSAL_LM = Family("any other causal LM", lambda config, directory: True, end_of_turn=ROLE_TURN_ENDS,
                       shape=llama_like)

FAMILIES: tuple[Family, ...] = (CHATGLM6B, CHATGLM6B_CONVERTED, GLM4_9B_CHAT, CHATGLM3, CHATGLM2, GLM, GLM4, GLM4_MOE,
                                LLAMA_STYLE, ANY_CAUSAL_LM)


def family_of(config: dict[str, Any] | None, directory: Path | None = None) -> Family:
    """The family of a checkpoint: the first entry of FAMILIES that recognises it (ANY_CAUSAL_LM at the least).

    Args:
        config: its config.json as a dict; None when it has none.
        directory: its local directory, if any (some families are recognised by their files).
    """
    return next(family for family in FAMILIES if family.recognise(config or {}, directory))


def family_of_source(source: str) -> Family:
    """The family of a resolved --model (glmtune.models.hub.resolve_model): a local directory or a hub name."""
    return family_of(local_config(source), Path(source) if Path(source).is_dir() else None)


def family_of_model(model: Any) -> Family:
    """The family of a loaded model (under a PEFT wrapper or not): a converted checkpoint is the family it loaded
    as (THUDM's ChatGLM3 is transformers' glm once loaded)."""
    return family_of(model.config.to_dict())  # a PEFT model's config is its base model's


def native_tokenizer(directory: Path) -> NativeTokenizer | None:
    """glmtune's rebuild of the tokenizer in `directory`, when it is one published as remote code."""
    return next((family.tokenizer for family in FAMILIES
                 if family.tokenizer is not None and family.tokenizer.matches(directory)), None)
