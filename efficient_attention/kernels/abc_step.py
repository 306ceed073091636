"""ABC's decoding step: one new token against the constant state of causal ABC (``attentions/abc.py``).

The state of a (batch, head): the slot sums ``mem_k``, ``mem_v`` ``(n, d)`` (``Σ_j e^{a_jl - c} k_j`` and the same
over ``v_j``), the normalisers ``norm (n,)`` (``Σ_j e^{a_jl - c}``) and the running max ``c`` of every slot score so
far (``mem_max``).  One step with query ``q``, key ``k``, value ``v`` and slot projection ``w (H, n, d)``:

    a = w k;  c' = max(c, max_l a_l);  sums <- e^{c - c'} sums + e^{a - c'} (k, v, 1)
    out = Σ_l softmax_l(q·mem_k_l / norm_l · scale) mem_v_l / norm_l

(a slot whose normaliser underflowed -- at or below :func:`empty_norm` -- is left out: weight 0).

Backends (one :class:`~efficient_attention.kernels.dispatch.Dispatcher`): ``"triton"`` -- the whole step in one
kernel launch (``_triton_abc_step.py``; a step is host-bound on a GPU, ~9 us per ATen op on an H200, and the
PyTorch form is ~30 ops); ``"reference"`` -- the PyTorch form, any device and dtype, autograd and dropout.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import ReferenceBackend, TritonBackend
from .dispatch import Dispatcher

__all__ = ["abc_step", "reference_abc_step", "empty_norm", "ABC_STEP"]

StepState = Tuple[Tensor, Tensor, Tensor, Tensor]  # mem_k, mem_v (B, H, n, d); norm (B, H, n); mem_max (B, H, 1)


def empty_norm(dtype: torch.dtype) -> float:
    """At or below this normaliser a slot is empty (its weights underflowed): 1 / normaliser must stay finite."""
    return torch.finfo(dtype).tiny * 1e8


def reference_abc_step(
    q: Tensor, k: Tensor, v: Tensor, w: Tensor, state: StepState, kpm: Optional[Tensor], scale: float, dropout_p: float
) -> Tuple[Tensor, StepState]:
    """The step with broadcast products over ``n`` slots and ``d`` dims (one token is too small for batched
    matmuls, whose reshapes cost more kernels than they save); the state's sums stay in their dtype, which the
    mixed-dtype products promote to.  A running max of ``-inf`` (no real key yet) is clamped to the lowest finite
    value, so its weights and decay are 0 (the sums are then still 0); a row of only empty slots gives 0."""
    mem_k, mem_v, mem_norm, mem_max = state
    a = (k * w.to(mem_k.dtype)).sum(-1)  # (B, H, n): (B, H, 1, d) * (H, n, d)
    if kpm is not None:
        a = a.masked_fill(kpm[:, None, :], float("-inf"))
    run = torch.maximum(a.amax(-1, keepdim=True), mem_max)  # (B, H, 1)
    safe = run.clamp_min(torch.finfo(run.dtype).min)
    decay = torch.exp(mem_max - safe).unsqueeze(-1)  # (B, H, 1, 1)
    e = torch.exp(a - safe)  # (B, H, n)
    et = e.unsqueeze(-1)  # (B, H, n, 1)
    mem_k = torch.addcmul(mem_k * decay, et, k)  # Σ e_j k_j  (B, H, n, d)
    norm = torch.addcmul(e, mem_norm, decay.squeeze(-1))  # Σ e_j  (B, H, n)
    num = (mem_k * q).sum(-1)  # (B, H, n)
    empty = norm <= empty_norm(norm.dtype)  # also underflowed slots: 1 / norm must stay finite
    inv = torch.reciprocal(norm).masked_fill_(empty, 0.0)
    logits = (num * inv * scale).masked_fill_(empty, torch.finfo(num.dtype).min)
    probs = torch.softmax(logits, dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p, training=True)
    mem_v = torch.addcmul(mem_v * decay, et, v)  # Σ e_j v_j  (B, H, n, d)
    out = ((probs * inv).unsqueeze(-1) * mem_v).sum(-2, keepdim=True)  # (B, H, 1, d)
    return out, (mem_k, mem_v, norm, run)


def abc_step_launch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    mem_k: Tensor,
    mem_v: Tensor,
    norm: Tensor,
    mem_max: Tensor,
    kpm: Optional[Tensor],
    scale: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(out (B, H, 1, d) in q's dtype, mem_k, mem_v, norm, mem_max)`` of one step in one launch (fp32 state)."""
    import triton

    from . import _triton_abc_step as kern
    from ._triton_common import launch

    bsz, heads, _, d = q.shape
    n = w.shape[1]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    w = w.contiguous()
    out = q.new_empty(bsz, heads, 1, d)
    new_k = mem_k.new_empty(bsz, heads, n, d)
    new_v = torch.empty_like(new_k)
    new_norm = norm.new_empty(bsz, heads, n)
    new_max = mem_max.new_empty(bsz, heads, 1)
    fmin = torch.finfo(torch.float32)
    launch(
        kern._abc_step,
        (bsz * heads,),
        (q, k, v, w, mem_k, mem_v, norm, mem_max, kpm.contiguous() if kpm is not None else q)
        + (out, new_k, new_v, new_norm, new_max),
        (heads, n, d, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
        + (*mem_k.stride(), *mem_v.stride(), *norm.stride(), mem_max.stride(0), mem_max.stride(1))
        + (scale, empty_norm(torch.float32), fmin.min),
        dict(
            HAS_KPM=kpm is not None,
            BN=max(triton.next_power_of_2(n), 16),
            BD=max(triton.next_power_of_2(d), 16),
        ),
    )
    return out, new_k, new_v, new_norm, new_max


# registered for torch.compile; an eager step calls the launch directly (the custom-op dispatcher's host time is
# comparable to the whole step's)
triton_abc_step = torch.library.custom_op("efficient_attention::triton_abc_step", abc_step_launch, mutates_args=())


@triton_abc_step.register_fake
def _(q, k, v, w, mem_k, mem_v, norm, mem_max, kpm, scale):
    bsz, heads, _, d = q.shape
    n = w.shape[1]
    return (
        q.new_empty(bsz, heads, 1, d),
        mem_k.new_empty(bsz, heads, n, d),
        mem_k.new_empty(bsz, heads, n, d),
        norm.new_empty(bsz, heads, n),
        mem_max.new_empty(bsz, heads, 1),
    )


# -- backends ---------------------------------------------------------------------------------------------------
ABC_STEP_MAX_TILE = 128 * 128  # slots x head dim of one program's state tile (fp32 registers)


class ABCStepTriton(TritonBackend):
    op = "abc_step"
    description = "the whole step in one Triton kernel (fp32 state; no autograd, no dropout)"

    @classmethod
    def input_reasons(  # type: ignore[override]  # each op's backends take that op's keyword params
        cls, q: Tensor, k: Tensor, v: Tensor, slots: int = 0, state_dtype=None, grad: bool = False, dropout=False
    ) -> List[str]:
        reasons = []
        if q.shape[2] != 1 or k.shape[2] != 1:
            reasons.append(f"{q.shape[2]} queries and {k.shape[2]} keys: the kernel takes one of each")
        if state_dtype != torch.float32:
            reasons.append(f"the state is {state_dtype}: the kernel keeps it in fp32")
        if grad:
            reasons.append("gradients are needed: the kernel has no backward")
        if dropout:
            reasons.append("dropout on the slot probabilities (training): the kernel draws no random numbers")
        if max(slots, 16) * max(q.shape[-1], 16) > ABC_STEP_MAX_TILE:
            reasons.append(f"{slots} slots x head dim {q.shape[-1]} is above {ABC_STEP_MAX_TILE} (one register tile)")
        return reasons

    @staticmethod
    def run(q, k, v, w, state, kpm, scale, dropout_p):
        step = torch.ops.efficient_attention.triton_abc_step if torch.compiler.is_compiling() else abc_step_launch
        out, *new = step(q, k, v, w, *state, kpm, scale)
        return out, tuple(new)


class ABCStepReference(ReferenceBackend):
    op = "abc_step"

    @staticmethod
    def run(q, k, v, w, state, kpm, scale, dropout_p):
        return reference_abc_step(q, k, v, w, state, kpm, scale, dropout_p)


ABC_STEP = Dispatcher("abc_step", (ABCStepTriton, ABCStepReference))


def abc_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    state: StepState,
    kpm: Optional[Tensor],
    scale: float,
    dropout_p: float = 0.0,
    backend: Optional[str] = None,
) -> Tuple[Tensor, StepState]:
    """One decoding step of causal ABC (see the module doc): q, k, v ``(B, H, 1, d)``, w ``(H, n, d)``, ``state``
    ``(mem_k, mem_v (B, H, n, d), norm (B, H, n), mem_max (B, H, 1))``, ``kpm`` ``(B, 1)`` bool (True: the new key is
    padding) -> ``(out (B, H, 1, d), new state)``; ``out`` is in q's dtype on the kernel, in the promoted dtype of
    q and the state on the reference path.  ``backend``: ``"triton"`` or ``"reference"`` to force one."""
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, w, *state))
    impl = ABC_STEP.select(
        backend, q, k, v, slots=w.shape[1], state_dtype=state[0].dtype, grad=grad, dropout=dropout_p > 0
    )
    return impl.run(q, k, v, w, state, kpm, scale, dropout_p)
