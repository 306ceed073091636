"""Self attention's q, k, v from one batched product (``EfficientAttention._project_qkv``, used on CUDA): the same
numbers as three projections, and nothing more kept for the backward where a mechanism takes it
(``fused_projections``; Performer and cosFormer keep only two of the three and opt out: on an H200 the product
still cost them one to two (L, B, C) tensors of peak memory at 32k with only their two kept ones stacked)."""

import pytest
import torch
from helpers import assert_close, build, case_id, inputs, mechanism_patterns

from efficient_attention import base
from efficient_attention.kernels._loader import cpu_extension

SELF = mechanism_patterns(lambda caps, p: not p.cross)
# CUDA: fp32 weights under bf16 autocast, the training setting whose saved tensors matter (the kernels' paths)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _run(m, q, fused: bool, monkeypatch):
    monkeypatch.setattr(base, "FUSED_PROJECTION_DEVICES", ("cpu", "cuda") if fused else ())
    x = q.detach().clone().requires_grad_()
    stores = {}

    def pack(t):
        store = t.untyped_storage()
        stores[store.data_ptr()] = store.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            h = x * 1.0  # not a leaf, as a layer's input in training (autocast caches casts of leaves only)
            out = m(h, h, h, need_weights=False)[0]
    out.float().backward(torch.ones_like(out, dtype=torch.float32))
    grads = [x.grad] + [p.grad.clone() for p in m.parameters() if p.grad is not None]
    m.zero_grad(set_to_none=True)
    return out.detach(), grads, sum(stores.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, pattern", SELF, ids=case_id)
def test_one_product_matches_three_and_keeps_no_more_for_the_backward(name, pattern, device, monkeypatch):
    cuda = device == "cuda"
    # eval: no dropout or feature redraws between the two runs (autograd records all the same)
    m = build(name, pattern, dtype=torch.float32 if cuda else torch.float64).to(device)
    q = inputs(name, pattern, dtype=m.out_proj.weight.dtype)[0].to(device)
    fused = _run(m, q, True, monkeypatch)
    plain = _run(m, q, False, monkeypatch)
    for a, b in zip([fused[0], *fused[1]], [plain[0], *plain[1]]):
        if cuda:  # bf16 products in another order: a few elements differ by a bf16 rounding step or two
            torch.testing.assert_close(a.float(), b.float(), atol=0.1, rtol=0.05)
        else:
            assert_close(a, b)
    assert len(fused[1]) == len(plain[1])
    # one storage for q, k, v costs nothing only if the backward keeps all three; checked on the kernels' paths (a
    # CPU without the C++ kernels runs Long-Short's reference path, which keeps fewer of them: 4224 more bytes)
    if m.fused_projections and (cuda or cpu_extension() is not None):
        extra, one = fused[2] - plain[2], q.numel() * (2 if cuda else q.element_size())  # one of q, k, v
        assert extra < one // 2, f"{name}: set fused_projections = False (it keeps {extra} more bytes)"
    monkeypatch.setattr(base, "FUSED_PROJECTION_DEVICES", (device,))
    if m._stacks_projections() and not m.ignores_key_value and m.num_kv_heads == m.num_heads:
        assert m._fuses_projections(q) == m.fused_projections
        with torch.no_grad():  # nothing kept for a backward: one product is free
            assert m._fuses_projections(q)


@pytest.mark.skipif(cpu_extension() is None, reason="the CPU memory check runs on the C++ kernels' paths")
def test_the_memory_check_catches_a_kept_projection(monkeypatch):
    """Performer's backward keeps k and v, not q: with all three from one product q's share of the storage stays
    alive, which the check above must catch."""
    from efficient_attention import Pattern, Performer

    monkeypatch.setattr(Performer, "fused_projections", True)
    with pytest.raises(AssertionError, match="keeps"):
        test_one_product_matches_three_and_keeps_no_more_for_the_backward(
            "performer", Pattern.NONCAUSAL_SELF, "cpu", monkeypatch
        )
