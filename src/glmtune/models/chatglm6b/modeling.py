"""ChatGLM-6B (THUDM/chatglm-6b, the first ChatGLM) as a native transformers model, without remote code.

Parameter names are THUDM's, so its checkpoints load as they are. What differs from a Llama-style decoder, each
matched to the official code's outputs (../shared/fixtures/chatglm/v1):
- attention is bidirectional over the context (everything before <sop>, the bos token), causal after it;
- 2-D rotary: the first half of each head turns with the token positions, in which every token from <sop> on sits
  at the position of [gMASK]/[MASK]; the second half turns with block positions (0 in the context, 1, 2... from
  <sop>). The rotary frequencies are rounded through fp16, as the official code creates them;
- the residual branch is the LayerNorm's output, scaled: x = LN(x) * sqrt(2 * 28) + sublayer(LN(x));
- query/key/value are fused per head ([q; k; v] for head 0, then head 1...), and attention scores are computed
  with q pre-divided by (layer_idx + 1), then multiplied back in fp32 (the official fp16 overflow guard).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg

from glmtune.models.chatglm6b.configuration import ChatGlm6bConfig

# The residual scale sqrt(2 * num_layers), with num_layers = 28 WHATEVER the config says: the official ChatGLMModel
# never passes num_layers to its GLMBlocks, whose default is 28. Measured: sqrt(2 * 2) on the 2-layer fixture
# misses the official logits by 7.2; sqrt(56) matches them to 2e-6.
RESIDUAL_ALPHA = math.sqrt(2 * 28)


def chatglm6b_position_ids(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: ChatGlm6bConfig
) -> torch.Tensor:
    """The official positions of every token, computed over the real (attention_mask == 1) tokens of each row.

    Returns (batch, 2, seq): row 0 = token positions (from <sop> on: the index of [gMASK], or of [MASK] when a row
    has no [gMASK]); row 1 = block positions (0 over the context, 1, 2... from <sop>). Row 1 == 0 also marks the
    context that every token attends to. In the 1-D variant row 0 keeps counting after <sop> for [gMASK] rows.
    Padding gets positions too (its keys are masked, so they never matter).
    """
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    index = (real.long().cumsum(-1) - 1).clamp(min=0)  # (batch, seq): position among the row's real tokens

    def first(token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        hits = (input_ids == token_id) & real  # (batch, seq)
        where = hits.long().argmax(-1, keepdim=True)  # (batch, 1): first hit, 0 when none
        return hits.any(-1), index.gather(-1, where)

    has_bos, context_length = first(config.bos_token_id)
    has_gmask, gmask_at = first(config.gmask_token_id)
    has_mask, mask_at = first(config.mask_token_id)
    missing = (~has_bos | ~(has_gmask | has_mask)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(
            f"ChatGLM-6B derives its positions and attention mask from [gMASK] ({config.gmask_token_id}) or [MASK] "
            f"({config.mask_token_id}) followed by <sop> ({config.bos_token_id}), but rows {missing[:8]} lack "
            "one of them: build the inputs with the tokenizer (it appends [gMASK] <sop>), or pass position_ids"
        )
    mask_position = torch.where(has_gmask[:, None], gmask_at, mask_at)  # (batch, 1)
    generated = index >= context_length  # (batch, seq): <sop> and what follows it
    block = torch.where(generated, index - context_length + 1, 0)
    if config.position_encoding_2d:
        position = torch.where(generated, mask_position, index)
    else:  # official 1-D rule: only [MASK] rows freeze the position after the context
        position = torch.where(generated & ~has_gmask[:, None], mask_position, index)
    return torch.stack([position, block], dim=1)  # (batch, 2, seq)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotary(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, heads, seq, dim) by positions (batch, seq), with the official fp16-rounded frequencies."""
    dim = x.shape[-1]
    # The official code builds inv_freq in fp32 then stores it as .half(); fp32 frequencies miss its logits on the
    # fixture by 1.3e-4 (20 tokens), more on longer sequences. Computed here, not a buffer: nothing to load or cast.
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    inv_freq = inv_freq.half().float()  # (dim / 2,)
    freqs = positions.float()[..., None] * inv_freq  # (batch, seq, dim / 2), fp32 whatever the model's dtype
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (batch, 1, seq, dim)
    return x * angles.cos().to(x.dtype) + _rotate_half(x) * angles.sin().to(x.dtype)


class ChatGlm6bAttention(nn.Module):
    def __init__(self, config: ChatGlm6bConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, x: torch.Tensor, allowed: torch.Tensor, position_ids: torch.Tensor, cache: Cache | None = None
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        qkv = self.query_key_value(x).view(batch, seq, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # each (batch, heads, seq, head_dim): fused per head
        if self.config.position_encoding_2d:
            half = self.head_dim // 2
            q = torch.cat([_rotary(q[..., :half], position_ids[:, 0]), _rotary(q[..., half:], position_ids[:, 1])], -1)
            k = torch.cat([_rotary(k[..., :half], position_ids[:, 0]), _rotary(k[..., half:], position_ids[:, 1])], -1)
        else:
            q, k = _rotary(q, position_ids[:, 0]), _rotary(k, position_ids[:, 0])
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (batch, heads, past + seq, head_dim)

        if self.config._attn_implementation == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        else:  # eager: the official arithmetic, step by step
            coeff = float(self.layer_idx + 1)
            scores = (q / (math.sqrt(self.head_dim) * coeff)) @ k.transpose(-1, -2)  # (batch, heads, seq, keys)
            scores = scores.masked_fill(~allowed, -10000.0).float() * coeff
            out = scores.softmax(dim=-1).to(v.dtype) @ v  # (batch, heads, seq, head_dim)
        return self.dense(out.transpose(1, 2).reshape(batch, seq, -1))


class ChatGlm6bMLP(nn.Module):
    def __init__(self, config: ChatGlm6bConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class ChatGlm6bBlock(GradientCheckpointingLayer):
    def __init__(self, config: ChatGlm6bConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = ChatGlm6bAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = ChatGlm6bMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        allowed: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Cache | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor:
        # The residual branch is the LayerNorm's OUTPUT, not the block's input.
        x = self.input_layernorm(hidden_states)  # (batch, seq, hidden)
        x = x * RESIDUAL_ALPHA + self.attention(x, allowed, position_ids, cache)
        x = self.post_attention_layernorm(x)
        return x * RESIDUAL_ALPHA + self.mlp(x)


class ChatGlm6bPreTrainedModel(PreTrainedModel):
    config_class = ChatGlm6bConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ChatGlm6bBlock"]
    _supports_sdpa = True
    # THUDM checkpoints store each layer's rotary frequencies; the official code ignores them on load, and so do we.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]
    # Takes a P-Tuning v2 prefix as a pre-filled DynamicCache (peft's prefix tuning) with positions derived from the
    # ids alone, as THUDM's ptuning does (models/prefix.py asks for this).
    accepts_prefix_cache = True


class ChatGlm6bModel(ChatGlm6bPreTrainedModel):
    def __init__(self, config: ChatGlm6bConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([ChatGlm6bBlock(config, i) for i in range(config.num_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """attention_mask: (batch, past + seq), 1 = real token, 0 = padding. position_ids: (batch, 2, seq), derived
        from input_ids (see chatglm6b_position_ids) when not given; needed with inputs_embeds or with a cache that
        is not empty (generate() passes them)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        if use_cache and cache is None and not (self.gradient_checkpointing and self.training):
            cache = DynamicCache(config=self.config)
        batch, seq, _ = inputs_embeds.shape
        past = cache.get_seq_length() if cache is not None else 0

        if position_ids is None:
            position_ids = self._derived_position_ids(input_ids, attention_mask, past)
        if position_ids.dim() != 3 or position_ids.shape[1] != 2:
            raise ValueError(
                "position_ids must be (batch, 2, seq) [token positions; block positions], "
                f"got {tuple(position_ids.shape)}"
            )
        allowed = self._attention_allowed(attention_mask, position_ids, batch, past, seq, inputs_embeds.device)

        hidden_states = inputs_embeds  # (batch, seq, hidden)
        all_hidden_states = ()
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(hidden_states, allowed, position_ids, cache=cache, use_cache=use_cache)
        hidden_states = self.final_layernorm(hidden_states)
        if output_hidden_states:  # the last entry is what lm_head reads (glmtune's chunked loss relies on it)
            all_hidden_states += (hidden_states,)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=all_hidden_states if output_hidden_states else None,
        )

    def _derived_position_ids(
        self, input_ids: torch.LongTensor | None, attention_mask: torch.Tensor | None, past: int
    ) -> torch.Tensor:
        """Positions from the ids fed, when none are given. A non-empty cache is then a P-Tuning v2 prefix (learned
        keys and values, THUDM's `past_key_values` from its PrefixEncoder, peft's prefix tuning): the ids are the
        whole sequence and their positions ignore the prefix, as THUDM's code computes them. Tokens fed after real
        cached ones (a decoding step) lack [gMASK] and <sop>, so they can't be placed: the caller passes positions,
        as generate() does."""
        needed = (
            "position_ids (batch, 2, seq) are needed with inputs_embeds or a cache of earlier tokens: ChatGLM-6B "
            "derives them from the whole sequence (see chatglm6b_position_ids)"
        )
        if input_ids is None:
            raise ValueError(needed)
        own_mask = None if attention_mask is None else attention_mask[:, -input_ids.shape[1] :]
        try:
            return chatglm6b_position_ids(input_ids, own_mask, self.config)
        except ValueError:
            if past:
                raise ValueError(needed) from None
            raise

    @staticmethod
    def _attention_allowed(
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        batch: int,
        past: int,
        seq: int,
        device: torch.device,
    ) -> torch.Tensor:
        """(batch, 1, seq, past + seq) bool, True = may attend: a real key that is before the query or in the
        context (block position 0). Cached keys always precede the queries, so only the new keys need the context
        test."""
        keys = past + seq
        if attention_mask is None:
            real = torch.ones(batch, keys, dtype=torch.bool, device=device)
        elif attention_mask.shape != (batch, keys):
            raise ValueError(
                f"attention_mask must be (batch, past + seq) = {(batch, keys)} of 1 (token) / 0 (padding), got "
                f"{tuple(attention_mask.shape)}: ChatGLM-6B builds its prefix-bidirectional mask itself"
            )
        else:
            real = attention_mask.bool()
        context = torch.cat([real.new_zeros(batch, past), position_ids[:, 1] == 0], dim=-1)  # (batch, keys)
        q = torch.arange(past, keys, device=device)[:, None]  # (seq, 1)
        k = torch.arange(keys, device=device)[None, :]  # (1, keys)
        allowed = real[:, None, :] & ((k <= q) | context[:, None, :])  # (batch, seq, keys)
        # A padding query may see nothing; let it see itself so softmax has no empty rows (its output is never read).
        allowed = allowed | (k == q)
        return allowed[:, None]


class ChatGlm6bForCausalLM(ChatGlm6bPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config: ChatGlm6bConfig):
        super().__init__(config)
        self.transformer = ChatGlm6bModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """labels: (batch, seq), -100 = ignored; shifted inside (logits[:, :-1] predict labels[:, 1:])."""
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)  # (batch, kept, vocab)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.vocab_size,
                num_items_in_batch=kwargs.get("num_items_in_batch"),
            )
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return out if return_dict else out.to_tuple()

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> dict:
        # The default extends position ids by +1 on every row; ChatGLM-6B's token positions stay at [gMASK], so
        # derive them from the whole sequence at each step and keep those of the tokens fed this step.
        kwargs.pop("position_ids", None)
        inputs = super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask, **kwargs)
        fed = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
        # A P-Tuning v2 prefix widens the mask over its virtual tokens (batch, prefix + total): they have no positions.
        own_mask = None if attention_mask is None else attention_mask[:, -input_ids.shape[1] :]
        position_ids = chatglm6b_position_ids(input_ids, own_mask, self.config)  # (batch, 2, total)
        inputs["position_ids"] = position_ids[..., -fed.shape[1] :]
        return inputs


__all__ = ["ChatGlm6bForCausalLM", "ChatGlm6bModel", "ChatGlm6bPreTrainedModel", "chatglm6b_position_ids"]
