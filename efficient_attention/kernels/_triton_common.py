"""``@triton.jit`` helpers shared by the attention kernels (``_triton_kernels.py``, ``_triton_landmark.py``).

Tiles are row-major ``(rows, HEAD_DIM)`` slices of one head; scores are kept in log2 units (``exp2``), the
log-sum-exp is handed over in natural units.  Imported only when Triton is installed.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """``a @ b``; fp32 inputs (``IEEE``) in full IEEE fp32, else the tensor cores' default precision."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _load_rows(base, offs_r, n_rows, offs_d, stride):
    """Rows ``offs_r`` (``stride`` elements apart: ``HEAD_DIM`` when contiguous) of one head at ``base``, zero past
    ``n_rows``."""
    return tl.load(base + offs_r[:, None] * stride + offs_d[None, :], mask=offs_r[:, None] < n_rows, other=0.0)


@triton.jit
def _store_rows(base, x, offs_r, n_rows, offs_d, stride):
    """Stores ``x`` (cast to the tensor's dtype) into rows ``offs_r`` (those below ``n_rows``, ``stride``
    elements apart) of one head at ``base``."""
    tl.store(
        base + offs_r[:, None] * stride + offs_d[None, :], x.to(base.dtype.element_ty), mask=offs_r[:, None] < n_rows
    )


@triton.jit
def _lse2(lse):
    """A stored (natural-unit) log-sum-exp in log2 units; ``-inf`` (an empty row) becomes ``+inf`` (weights 0)."""
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _finish(acc, m_i, l_i):
    """The online softmax's end: ``(out, lse)`` from the accumulator, the running max (log2 units) and the
    normaliser; a row that saw nothing gets ``out = 0``, ``lse = -inf``."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    return out, lse
