"""LoRA linear layers computed as one autograd node: the base product, the adapter's two small products and their sum
with fewer operators and no full-width temporaries.

peft's LoRA Linear computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: the scaling multiplies, and the sum
adds, a whole (tokens x out_features) tensor in forward and again in backward, and over a 16-bit base it first
copies x to fp32 (the adapter's dtype) for autocast to copy it back to 16 bits. Here the scaling goes on the
(tokens x rank) product, the adapter's output is accumulated into the base output by the matmul itself (addmm),
and backward does the same for the input's gradient: the same sums, about a third fewer operators per layer
(bench/train_speed.py --profile).

Only for the plain case, checked at every call: one active vanilla LoRA adapter (no DoRA or other variant), no
dropout, not merged, adapters enabled, a plain nn.Linear base (not quantized), no per-call adapter names. Anything
else runs peft's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear


class FusedLoraLinear(LoraLinear):
    """peft's LoRA Linear with the plain case computed by _LoraProduct; same parameters, state dict and adapters."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self._plain_adapter(args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        dtype = _compute_dtype(x, base.weight)
        lora_a, lora_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        bias = None if base.bias is None else base.bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return _LoraProduct.apply(x.to(dtype), base.weight.to(dtype), bias, lora_a.to(dtype), lora_b.to(dtype),
                                      float(self.scaling[adapter]))

    def _plain_adapter(self, args: tuple, kwargs: dict[str, Any]) -> str | None:
        """The one active adapter when this call is the plain case (see the module docstring), else None."""
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        adapter = self.active_adapters[0]
        if adapter not in self.lora_A or adapter in self.lora_variant or getattr(self, "lora_bias", {}).get(adapter):
            return None
        if type(self.base_layer) is not torch.nn.Linear:
            return None
        if not isinstance(self.lora_dropout[adapter], torch.nn.Identity) and self.training:
            return None
        return adapter


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype autocast would compute a linear layer in, else the base weight's (peft's result dtype)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


class _LoraProduct(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T, every operand in one dtype; gradients for x, A, B (and W, b if they need it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (tokens, in)
        scaled = (rows @ lora_a.t()).mul_(scaling)  # (tokens, rank): the scaling on the small product
        out = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())
        out.addmm_(scaled, lora_b.t())  # (tokens, out): the adapter accumulated by the matmul itself
        ctx.save_for_backward(rows, weight, lora_a, lora_b, scaled)
        ctx.scaling, ctx.has_bias, ctx.shape = scaling, bias is not None, x.shape
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, weight, lora_a, lora_b, scaled = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1]).to(rows.dtype)  # (tokens, out)
        grad_scaled = (grad @ lora_b).mul_(ctx.scaling)  # (tokens, rank): d(loss)/d(x A^T)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight).addmm_(grad_scaled, lora_a).reshape(ctx.shape)
        if ctx.needs_input_grad[1]:
            grad_w = grad.t() @ rows
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        grad_a = grad_scaled.t() @ rows if ctx.needs_input_grad[3] else None  # (rank, in)
        grad_b_lora = grad.t() @ scaled if ctx.needs_input_grad[4] else None  # (out, rank)
        return grad_x, grad_w, grad_b, grad_a, grad_b_lora, None


def fuse_lora_linears(model: Any) -> int:
    """Give every peft LoRA Linear of the model the fused forward (in place); returns how many layers it changed."""
    changed = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = FusedLoraLinear
            changed += 1
    return changed
