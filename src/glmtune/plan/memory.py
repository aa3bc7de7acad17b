"""Peak memory of a LoRA (or full, freeze, P-Tuning v2) training step, estimated from the model's shape and the
run's settings.

Every term counts the bytes alive at the peak, which is early in backward: the weights, LoRA's weights, their
gradients and AdamW's states, every tensor the forward pass saved for backward, the loss's logits and the
gradients backward is computing. The per-tensor accounting was checked against torch's saved-tensor hooks on a
GlmForCausalLM layer with peft LoRA (fp32 and bf16, dropout on and off, sdpa and eager): tests/test_plan.py holds
it within 2% of what backward saves (test_layer_activations_are_what_backward_saves). The
CPU constants (runtime baseline, allocator slack) come from bench/plan_accuracy.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from glmtune.plan.shape import (
    Linear,
    ModelShape,
    active_parameter_count,
    is_moe_layer,
    layer_linears,
    layer_parameter_count,
    lora_parameter_count,
    parameter_count,
)

GIB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# bitsandbytes: 8-bit weights plus one fp32 scale per row; NF4 packs two weights a byte plus an fp32 absmax per
# block of 64 (without double quantization).
QUANT_BYTES = {"8bit": 1.0, "4bit": 0.5 + 4 / 64}
# glmtune.train.loss's CHUNK_TOKENS and LOGITS_BUDGET_BYTES, not imported (that module imports torch); a test
# checks they agree.
CHUNK_TOKENS = 256
LOGITS_BUDGET_BYTES = 256 * 2**20
# Measured (bench/plan_accuracy.py): RSS of a process that imported torch, transformers and peft and ran a first
# training step of a tiny model (thread pools, oneDNN kernels, Python objects): about 0.55 GiB on CPU.
CPU_RUNTIME_BYTES = 0.55 * GIB
# The CUDA context and kernels that PyTorch loads on first use: 0.3-0.6 GiB outside torch's allocator.
CUDA_RUNTIME_BYTES = 0.5 * GIB


@dataclass(frozen=True)
class Setup:
    """What decides the memory of a training step, beside the model's shape."""

    seq_len: int
    batch_size: int
    lora_rank: int
    targets: tuple[Linear, ...]
    gradient_checkpointing: bool = False
    dtype: str = "fp32"  # the base weights' and the computation's precision
    quantization: str | None = None  # "8bit" / "4bit": the decoder's frozen linear weights
    chunked_loss: bool = True
    lora_dropout: float = 0.1
    attention: str = "sdpa"
    device: str = "cpu"
    train_router: bool = False  # MoE (--train_router): the routers' weights are trained too, saved with the adapter
    finetuning_type: str = "lora"  # "full" / "freeze": the model's own weights trained, no adapter
    trainable_layers: int = 2  # freeze: the last N decoder blocks (the first -N when negative)
    pre_seq_len: int = 128  # ptuning: the prefix's virtual tokens
    prefix_projection: bool = False  # ptuning: the prefix computed through a two-layer MLP

    @property
    def tokens(self) -> int:
        return self.seq_len * self.batch_size


@dataclass(frozen=True)
class Estimate:
    lines: dict[str, float]  # component -> bytes, in the order they are printed
    trainable_parameters: int
    parameters: int
    active_parameters: int = 0  # MoE: those one token uses (parameters for a dense model)

    @property
    def total(self) -> float:
        return sum(self.lines.values())


def estimate(shape: ModelShape, setup: Setup) -> Estimate:
    """Peak memory of one LoRA training step, as the bytes of each term alive at the peak (see the module docstring).

    Args:
        shape: the model's dimensions (shape_from_config).
        setup: the run's settings: batch, sequence length, precision, quantization, LoRA rank and targets, device.
    Returns:
        The bytes of each component, in the order `glmtune plan` prints them, and the parameter counts.
    """
    params = parameter_count(shape)
    if setup.finetuning_type == "ptuning":
        return prefix_estimate(shape, setup, params)
    if setup.finetuning_type != "lora":
        return whole_model_estimate(shape, setup, params)
    lora = lora_parameter_count(shape, list(setup.targets), setup.lora_rank)
    router = router_parameter_count(shape) if setup.train_router else 0
    lines = {
        "weights": weight_bytes(shape, setup, params),
        # peft keeps the adapters in fp32 whatever the base precision (autocast_adapter_dtype=True); AdamW keeps
        # exp_avg and exp_avg_sq, each the adapter's size in fp32.
        "LoRA weights": 4.0 * lora,
        "gradients": 4.0 * lora,
        "optimizer states": 8.0 * lora,
        # peft's modules_to_save: a trainable fp32 copy of each router beside the frozen one, its gradient and
        # AdamW's two states.
        "trained router (copy, gradients, optimizer)": 16.0 * router,
        "activations": activation_bytes(shape, setup),
        "adapted weights (parameter LoRA)": parameter_lora_bytes(shape, setup),
        "loss / logits": loss_bytes(shape, setup, frozen_output_layer=True),
        "allocator slack": allocator_slack_bytes(shape, setup),
        "runtime baseline": CPU_RUNTIME_BYTES if setup.device == "cpu" else CUDA_RUNTIME_BYTES,
    }
    for line in ("trained router (copy, gradients, optimizer)", "adapted weights (parameter LoRA)"):
        if not lines[line]:
            del lines[line]
    return Estimate(lines, lora + router, params, active_parameter_count(shape))


def whole_model_estimate(shape: ModelShape, setup: Setup, params: int) -> Estimate:
    """Full and freeze tuning (train/finetuning.py): the trained weights are kept in fp32 (master weights; a copy up
    from bf16/fp16), with an fp32 gradient and AdamW's two fp32 states each. Every linear layer keeps its input for
    its weight's gradient, as LoRA without dropout on every linear does; for freeze this is an upper bound (the
    frozen blocks below the first trained one keep nothing for backward)."""
    trainable = trainable_parameter_count(shape, setup)
    every_linear = tuple(lin for lin in shape.linears if lin.copies == 1)
    as_lora = replace(setup, targets=every_linear, lora_dropout=0.0, lora_rank=0)
    lines = {
        "weights": weight_bytes(shape, setup, params) + trainable * (4.0 - DTYPE_BYTES[setup.dtype]),
        "gradients": 4.0 * trainable,
        "optimizer states": 8.0 * trainable,
        "activations": activation_bytes(shape, as_lora),
        "loss / logits": loss_bytes(shape, setup, frozen_output_layer=False),  # full trains it; freeze: a bound
        "allocator slack": allocator_slack_bytes(shape, as_lora),
        "runtime baseline": CPU_RUNTIME_BYTES if setup.device == "cpu" else CUDA_RUNTIME_BYTES,
    }
    return Estimate(lines, trainable, params, active_parameter_count(shape))


def prefix_parameter_count(shape: ModelShape, setup: Setup) -> int:
    """peft's PrefixEncoder as train/ptuning.py builds it: keys and values of `pre_seq_len` virtual tokens for every
    layer, each as wide as the layer's keys (kv heads x head dim: peft sizes the prefix for grouped-query
    attention), learned directly, or through an MLP (kv -> hidden -> every layer's keys and values, with biases)."""
    kv, every_layer = shape.kv_dim, 2 * shape.num_layers * shape.kv_dim
    if not setup.prefix_projection:
        return setup.pre_seq_len * every_layer
    return setup.pre_seq_len * kv + (kv + 1) * shape.hidden_size + (shape.hidden_size + 1) * every_layer


def prefix_estimate(shape: ModelShape, setup: Setup, params: int) -> Estimate:
    """P-Tuning v2: the prefix in fp32 with its gradient and AdamW's two states. Backward runs through every layer
    (each layer's prefix keys and values need their gradient), so every layer keeps what a forward without LoRA
    saves, with keys and values longer by the prefix; beside them the prefix itself, computed once per step for
    the whole batch in fp32 (and the MLP's two hidden tensors with --prefix_projection), plus its copy in the
    compute precision."""
    w = DTYPE_BYTES[setup.dtype]
    trainable = prefix_parameter_count(shape, setup)
    plain = replace(setup, targets=(), lora_dropout=0.0)
    every_layer = setup.batch_size * setup.pre_seq_len * 2 * shape.num_layers * shape.kv_dim
    prefix = every_layer * (4 + (w if w != 4 else 0))  # the encoder's fp32 output, and its cast
    if setup.prefix_projection:
        prefix += setup.batch_size * setup.pre_seq_len * shape.hidden_size * 4 * 2  # the MLP's linear and tanh
    attended = every_layer * w  # each layer's saved keys and values include the prefix's
    if setup.attention == "eager":  # the softmax is wider by the prefix for every query
        attended += setup.tokens * shape.num_layers * shape.num_heads * setup.pre_seq_len * (4 + (w if w != 4 else 0))
    lines = {
        "weights": weight_bytes(shape, setup, params),
        "prefix weights": 4.0 * trainable,
        "gradients": 4.0 * trainable,
        "optimizer states": 8.0 * trainable,
        "activations": activation_bytes(shape, plain) + attended,
        "prefix (keys and values of every layer)": float(prefix),
        "loss / logits": loss_bytes(shape, setup, frozen_output_layer=True),
        "allocator slack": allocator_slack_bytes(shape, plain),
        "runtime baseline": CPU_RUNTIME_BYTES if setup.device == "cpu" else CUDA_RUNTIME_BYTES,
    }
    return Estimate(lines, trainable, params, active_parameter_count(shape))


def trainable_parameter_count(shape: ModelShape, setup: Setup) -> int:
    """What full tuning trains (every parameter) or freeze tuning (those of the chosen blocks)."""
    if setup.finetuning_type == "full":
        return parameter_count(shape)
    n = setup.trainable_layers
    layers = range(shape.num_layers - n, shape.num_layers) if n > 0 else range(min(-n, shape.num_layers))
    return sum(layer_parameter_count(shape, layer) for layer in layers if layer >= 0)


def router_parameter_count(shape: ModelShape) -> int:
    """The routers' weights, every MoE layer's (0 for a dense model)."""
    return shape.moe_layers * shape.extra_layer_params


def weight_bytes(shape: ModelShape, setup: Setup, params: int) -> float:
    width = DTYPE_BYTES[setup.dtype]
    if setup.quantization is None:
        # glm4_moe keeps its routers in fp32 whatever the load precision (_keep_in_fp32_modules_strict)
        return float(params * width + router_parameter_count(shape) * (DTYPE_BYTES["fp32"] - width))
    # bitsandbytes quantizes the decoder's nn.Linear layers; embeddings, norms and the output layer are loaded in
    # the compute precision, then peft's prepare_model_for_kbit_training (glmtune train does it) casts them to fp32,
    # as it does the fused 3-D expert tensors of transformers 5's MoE models, which bitsandbytes can't quantize.
    fused = replace(shape, linears=tuple(lin for lin in shape.linears if lin.copies == 1))
    linear = parameter_count(replace(fused, vocab_size=0, norms_per_layer=0, extra_layer_params=0)) - _final_norm(shape)
    return linear * QUANT_BYTES[setup.quantization] + (params - linear) * DTYPE_BYTES["fp32"]


def _final_norm(shape: ModelShape) -> int:
    return shape.hidden_size * (2 if shape.norm_bias else 1)


def layer_activation_bytes(shape: ModelShape, setup: Setup, moe: bool = False) -> float:
    """Bytes one decoder layer saves for backward, per token, beside its input (counted by the caller)."""
    w = DTYPE_BYTES[setup.dtype]
    h, q, kv, heads = shape.hidden_size, shape.q_dim, shape.kv_dim, shape.num_heads
    inter = shape.moe_active_intermediate if moe else shape.intermediate_size
    # Norms: RMSNorm's pow and mul keep their input; below fp32 they keep the fp32 copy they compute in
    # (the first norm's input is the layer input itself in fp32: not counted twice). Frozen norm weights make
    # the normalised output unnecessary for backward.
    norms = (shape.norms_per_layer - (1 if w == 4 else 0)) * h * 4
    # Attention: the rotated q and k, v, the output, and SDPA's fp32 logsumexp per head (flash attention keeps
    # no score matrix). Eager attention keeps the fp32 softmax (heads x seq per token), its cast below fp32,
    # and k, v repeated to every query head.
    attention = (2 * q + 2 * kv) * w + 4 * heads
    if setup.attention == "eager":  # q, k and v repeated per query head, the softmax; no output kept
        attention = 3 * q * w + heads * setup.seq_len * (4 + (w if w != 4 else 0))
    # MLP: SwiGLU keeps the gate and up projections (silu and the product read them) and silu's output;
    # a GELU MLP keeps GELU's input. MoE layers hold each token's top-k experts' (and shared experts') widths.
    mlp = (3 if shape.gated_mlp else 1) * inter * w
    return norms + attention + mlp + lora_input_bytes(shape, setup, moe)


def lora_input_bytes(shape: ModelShape, setup: Setup, moe: bool = False) -> float:
    """What LoRA adds: the A matrices need their input in backward. Frozen base layers don't keep theirs, so
    without LoRA the normed inputs would be freed. peft computes the adapter in fp32: below fp32 each adapted
    layer casts its own fp32 copy; with dropout each keeps the dropout mask and the dropped copy (the mask is fp32
    on CPU, whose dropout multiplies by a noise tensor, and bool on CUDA's fused kernel)."""
    w = DTYPE_BYTES[setup.dtype]
    widths = {"attn_in": shape.hidden_size, "attn_out": shape.q_dim, "mlp_in": shape.hidden_size,
              "mlp_act": shape.moe_active_intermediate if moe else shape.intermediate_size}
    present = {lin.name for lin in layer_linears(shape, moe)}
    targets = [t for t in setup.targets if t.name in present and not t.as_parameter]
    # peft's parameter LoRA refuses dropout, so an adapter with any parameter target has none (train/skeleton.py)
    dropout = 0.0 if any(t.as_parameter for t in setup.targets) else setup.lora_dropout
    total = 4.0 * setup.lora_rank * len(targets)  # each A's output, read by B's backward
    for group, width in widths.items():
        n = sum(t.feeds_from == group for t in targets)
        if not n:
            continue
        if dropout > 0:
            total += n * width * (4 + (4 if setup.device == "cpu" else 1))
        elif w == 4:
            total += width * w  # the shared input, kept once
        else:
            total += n * width * 4
    return total


def parameter_lora_bytes(shape: ModelShape, setup: Setup) -> float:
    """LoRA on parameters (peft's ParamWrapper: a MoE's fused experts) materialises each adapted weight W + BA on
    every forward, and the layer keeps it for backward (the expert matmuls read it): a copy of every adapted
    layer's weights, in the compute precision, for every layer (one layer under gradient checkpointing), plus the
    delta and its gradient of the widest layer while backward passes it."""
    w = DTYPE_BYTES[setup.dtype]
    per_layer = [sum(t.weights for t in setup.targets if t.as_parameter and t.name in
                     {lin.name for lin in layer_linears(shape, is_moe_layer(shape, layer))})
                 for layer in range(shape.num_layers)]
    kept = max(per_layer) if setup.gradient_checkpointing else sum(per_layer)
    return float((kept + 2 * max(per_layer)) * w)


def activation_bytes(shape: ModelShape, setup: Setup) -> float:
    w = DTYPE_BYTES[setup.dtype]
    dense_layers = shape.num_layers - shape.moe_layers
    per_layer = [layer_activation_bytes(shape, setup, moe=False)] * dense_layers
    per_layer += [layer_activation_bytes(shape, setup, moe=True)] * shape.moe_layers
    # Every layer's input (the residual stream) plus the final norm's input and output, and the loss's gathered
    # copy of the final hidden states.
    stream = (shape.num_layers + 3) * shape.hidden_size * w
    if setup.gradient_checkpointing:
        # Only layer inputs are kept; backward recomputes one layer at a time, whose saved tensors then exist.
        saved = stream + max(per_layer)
    else:
        saved = stream + sum(per_layer)
    # Backward's own working set at its widest point, the MLP: the gradients of the gate/up output, of the
    # product and of the residual stream.
    inter = max(shape.intermediate_size, shape.moe_active_intermediate)
    working = (3 * inter + 2 * shape.hidden_size) * w
    return setup.tokens * (saved + working)


def allocator_slack_bytes(shape: ModelShape, setup: Setup) -> float:
    """CPU only: freed memory the process keeps. glibc serves blocks below its mmap threshold (which grows up to
    32 MiB as blocks are freed) from its heaps and keeps them once freed, so a step's churn of activation-sized
    tensors stays resident. Measured (bench/plan_accuracy.py) at 0.4-0.9x one forward pass's saved activations,
    with or without checkpointing (the forward allocates them either way); 0.75x is the middle. With
    MALLOC_MMAP_THRESHOLD_=1048576 it disappears (1.59 -> 0.85 GiB peak for 55M params, 2 x 1024 tokens)."""
    if setup.device != "cpu":
        return 0.0
    forward = sum(layer_activation_bytes(shape, setup, moe=layer >= shape.num_layers - shape.moe_layers)
                  for layer in range(shape.num_layers))
    return 0.75 * setup.tokens * forward


def loss_bytes(shape: ModelShape, setup: Setup, frozen_output_layer: bool) -> float:
    """The logits and their gradient at the loss, the peak of the step for large vocabularies. `frozen_output_layer`:
    the output layer takes no gradient (LoRA, P-Tuning), so glmtune's loss always goes chunk by chunk."""
    w = DTYPE_BYTES[setup.dtype]
    if setup.chunked_loss and (frozen_output_layer or setup.tokens * shape.vocab_size * 4 > LOGITS_BUDGET_BYTES):
        # glmtune.train.loss: chunks of 256 supervised tokens (a frozen layer's with their gradient in the same
        # pass, a trained one's recomputed in backward); at most one chunk's logits exist, with their fp32 copy,
        # log-softmax and gradients.
        rows = min(CHUNK_TOKENS, setup.tokens)
    else:
        # transformers' ForCausalLMLoss, or glmtune's loss in one pass for a trained output layer when the batch's
        # fp32 logits fit in LOGITS_BUDGET_BYTES: the whole (batch x seq x vocab) logits.
        rows = setup.tokens
    # cross_entropy keeps the fp32 log-softmax; backward adds the gradient of the log-softmax and of the logits
    # (fp32), plus the compute-dtype logits and their gradient below fp32 (the upcast is a copy).
    per_row = shape.vocab_size * (3 * 4 + (2 * w if w != 4 else 0))
    return float(rows * per_row)
