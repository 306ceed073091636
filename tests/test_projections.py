"""Self attention's q, k, v from one batched product (``EfficientAttention._project_qkv``, used on CUDA): the same
numbers as three projections, and no extra memory kept for the backward where a mechanism opts in."""

import pytest
import torch
from helpers import assert_close, build, case_id, inputs, mechanism_patterns

from efficient_attention import base

SELF = mechanism_patterns(lambda caps, p: not p.cross)


def _run(m, q, fused: bool, monkeypatch):
    monkeypatch.setattr(base, "FUSED_PROJECTION_DEVICES", ("cpu", "cuda") if fused else ())
    x = q.detach().clone().requires_grad_()
    stores = {}

    def pack(t):
        store = t.untyped_storage()
        stores[store.data_ptr()] = store.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = m(x, x, x, need_weights=False)[0]
    out.backward(torch.ones_like(out))
    grads = [x.grad] + [p.grad.clone() for p in m.parameters() if p.grad is not None]
    m.zero_grad(set_to_none=True)
    return out.detach(), grads, sum(stores.values())


@pytest.mark.parametrize("name, pattern", SELF, ids=case_id)
def test_one_product_matches_three_and_keeps_no_more_for_the_backward(name, pattern, monkeypatch):
    m = build(name, pattern)  # eval: no dropout or feature redraws between the two runs (autograd records all)
    q = inputs(name, pattern)[0]
    fused = _run(m, q, True, monkeypatch)
    plain = _run(m, q, False, monkeypatch)
    assert_close(fused[0], plain[0])
    assert len(fused[1]) == len(plain[1])
    for a, b in zip(fused[1], plain[1]):
        assert_close(a, b)
    if m.fused_projections:  # the one storage of q, k, v costs nothing only if the backward keeps all three
        extra, one = fused[2] - plain[2], q.numel() * q.element_size()  # one of q, k, v kept alive: `one` bytes
        assert extra < one // 2, f"{name}: set fused_projections = False ({extra} more bytes saved)"
    else:
        monkeypatch.setattr(base, "FUSED_PROJECTION_DEVICES", ("cpu",))
        assert not m._fuses_projections(q)
        with torch.no_grad():  # nothing kept for a backward: one product is free
            assert m._fuses_projections(q)
