"""Guards for backends whose gradients are computed in the forward pass and saved.

Their backward only scales the saved gradients, so a second derivative through them would be
silently missing the pair terms' curvature (and ``once_differentiable`` does not catch it when
grad_output is a constant, as the loss's 1/count is). `first_order_only` ties the returned
gradient to the differentiable input, so that differentiating it again raises instead, and
`autocast_off` keeps that scaling in float32 when backward runs inside an autocast region, and
`weighted_sum` keeps it out of cuBLAS.
"""
from __future__ import annotations

import contextlib

import torch


def autocast_off(device: torch.device):
    """A context that turns autocast off on `device` where it is on: the loss and the saved
    gradients' scaling run in float32 (a bf16 GEMM would select other pairs, and round every
    gradient to bf16)."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except (RuntimeError, ValueError):  # a device type autocast does not know
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False) if enabled else contextlib.nullcontext()


def weighted_sum(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """sum_t weights[t] * stacked[t] (weights: T, stacked: T x ...), elementwise in a fixed
    order, accumulated in float32 at least and returned in stacked's dtype: as a contraction
    it would be a cuBLAS matmul on CUDA, which a script's TF32 setting rounds (about 1e-3) and
    whose summation order is cuBLAS's to choose. No device sync."""
    acc = torch.promote_types(stacked.dtype, torch.float32)
    w = weights.to(acc)
    out = stacked[0].to(acc) * w[0]
    for t in range(1, stacked.shape[0]):
        # not in place: torch.func has no batching rule for addcmul_ (jacrev warned of a slow
        # fallback); the same kernel, the same bits
        out = torch.addcmul(out, stacked[t].to(acc), w[t])
    return out.to(stacked.dtype)


class _SecondOrderError(torch.autograd.Function):
    # an identity in the forward: torch.func can batch it itself (jacrev vmaps the backward)
    generate_vmap_rule = True

    @staticmethod
    def forward(grad, anchor, backend):
        return grad.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):  # the form torch.func transforms need
        ctx.backend = inputs[2]

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            f"the {ctx.backend} backend computes first-order gradients only (they are made in the "
            "forward pass); for second derivatives (double backward, Hessian-vector products) "
            "use IDDCLoss(backend='reference')")


def first_order_only(grad, anchor: torch.Tensor, backend: str):
    """`grad`, unchanged; when the backward pass builds a graph (create_graph=True), one whose
    own backward raises a RuntimeError naming `backend`. `anchor` is the input the gradient is
    for: it connects the result to the graph."""
    if grad is None or not torch.is_grad_enabled() or not anchor.requires_grad:
        return grad
    return _SecondOrderError.apply(grad, anchor, backend)


def forward_mode_unsupported(backend: str):
    """The jvp of a saved-gradient backend: forward-mode AD would need the tangents' products
    with gradients the forward pass only makes for reverse mode, so it raises, naming the way."""
    raise RuntimeError(
        f"the {backend} backend supports reverse-mode gradients only (backward, torch.func.grad "
        "or vjp); for forward-mode AD (torch.func.jvp, jacfwd, forward-over-reverse Hessians) "
        "use IDDCLoss(backend='reference')")


def vmap_unsupported(backend: str):
    """The vmap rule of a saved-gradient backend: its walk over the pairs has none (torch's own
    error asked the user to implement one, for jacfwd too, which vmaps its jvp), so it raises,
    naming the way."""
    raise RuntimeError(
        f"the {backend} backend cannot run under torch.func.vmap (it has no batching rule): "
        "use IDDCLoss(backend='reference', check_finite=False) for vmap of the loss, or loop "
        "over the batch; torch.func.grad, vjp and jacrev work with every backend")
