"""An optional load-balancing loss on a mixture of experts' router (--moe_aux_loss_coef).

transformers' glm4_moe computes none (GLM-4.5 balances its experts with the router's e_score_correction_bias, with
no loss term), so glmtune adds DeepSeek-V3's balance loss, computed over the batch's tokens:
L = sum_i f_i * P_i, where f_i is expert i's share of the routed tokens times n_experts / top_k (1 when balanced)
and P_i the mean over tokens of the router's normalised sigmoid scores. Its gradient enters the graph at each
router's output (as Megatron-LM's MoEAuxLossAutoScaler does), so the trainer's loss, the chunked loss and the
logged loss stay the language-model loss. Like transformers' MoE models' router_aux_loss_coef it applies per
micro-batch.
"""

from __future__ import annotations

from typing import Any

import torch

from glmtune.errors import UserError


class _AddAuxGradient(torch.autograd.Function):
    """Identity on `output`; backward also sends `coef` as the gradient of `aux` (a loss term added to the graph
    without adding it to the loss value)."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, aux: torch.Tensor, coef: float) -> torch.Tensor:
        ctx.coef = coef
        ctx.aux_shape = aux.shape
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        return grad, torch.full(ctx.aux_shape, ctx.coef, dtype=torch.float32, device=grad.device), None


def balance_loss(router_logits: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's balance loss of one sigmoid router over its tokens: 1 when the experts are evenly used, more
    the more the scores pile onto the experts that are chosen most."""
    experts, top_k = router_logits.shape[-1], top_k_index.shape[-1]
    scores = router_logits.float().sigmoid()
    probabilities = scores / scores.sum(dim=-1, keepdim=True)
    chosen = torch.nn.functional.one_hot(top_k_index.reshape(-1, top_k), experts).sum(dim=1).float()
    share = chosen.mean(dim=0) * experts / top_k
    return (share.detach() * probabilities.reshape(-1, experts).mean(dim=0)).sum()


def add_balance_loss(model: Any, router_suffix: str, coef: float) -> int:
    """Hook every router module of `model` (named `...<router_suffix>`, returning (logits, weights, indices)) so
    that backward adds coef x its balance loss. Returns how many routers were hooked.

    Raises:
        UserError: no router module by that name.
    """
    def hook(module: Any, inputs: Any, output: Any) -> Any:
        logits, weights, indices = output
        if not torch.is_grad_enabled() or not weights.requires_grad:
            return output  # evaluation, or nothing upstream is trained
        return logits, _AddAuxGradient.apply(weights, balance_loss(logits, indices), coef), indices

    # With --train_router, peft's wrapper of the router carries the name (its copies are named below it).
    routers = [module for name, module in model.named_modules() if name.endswith(f".{router_suffix}")]
    if not routers:
        raise UserError(f"--moe_aux_loss_coef: the model has no router module '{router_suffix}'")
    for router in routers:
        router.register_forward_hook(hook)
    return len(routers)
