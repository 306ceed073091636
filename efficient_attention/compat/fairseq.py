"""``@fsmha``: make any mechanism a drop-in for ``fairseq.modules.MultiheadAttention``.

Our base class already has fairseq's constructor, forward and incremental-state
protocol.  The wrapper adds what only fairseq passes or calls: the
``dictionary`` and ``xformers_*`` constructor keywords (xformers configs are
rejected rather than ignored), ``prepare_for_onnx_export_`` and
``_set_skip_embed_dim_check``.  The causal mask that fairseq's decoder passes
as ``attn_mask`` is accepted by every causal mechanism (the base recognises it).
"""

from __future__ import annotations

from typing import Type, TypeVar

from ..base import EfficientAttention

__all__ = ["fsmha"]

T = TypeVar("T", bound=Type[EfficientAttention])


def _require_fairseq() -> None:
    try:
        import fairseq  # noqa: F401
    except ImportError as err:  # pragma: no cover - exercised by a test with fairseq hidden
        raise ImportError(
            "fsmha needs fairseq; install it with "
            "`pip install --no-build-isolation fairseq-fixed==0.12.3.1` (see README.md)"
        ) from err


def fsmha(cls: T) -> T:
    """Return a subclass of ``cls`` usable wherever fairseq builds a ``MultiheadAttention``.

    Example::

        @fsmha
        class FSABC(ABC):
            pass

        attn = FSABC(embed_dim=512, num_heads=8, dropout=0.2, self_attention=True, causal=True)
    """
    if not (isinstance(cls, type) and issubclass(cls, EfficientAttention)):
        raise TypeError(f"fsmha expects an EfficientAttention subclass, got {cls!r}")
    _require_fairseq()

    class FairseqMultiheadAttention(cls):  # type: ignore[misc, valid-type]
        def __init__(
            self,
            *args,
            dictionary=None,
            xformers_att_config=None,
            xformers_blocksparse_layout=None,
            xformers_blocksparse_blocksize=16,
            **kwargs,
        ):
            if xformers_att_config is not None or xformers_blocksparse_layout is not None:
                raise ValueError(
                    f"{cls.__name__} is an efficient-attention mechanism; xformers_att_config / "
                    "xformers_blocksparse_layout do not apply to it"
                )
            super().__init__(*args, **kwargs)
            self.onnx_trace = False
            self.skip_embed_dim_check = False

        @classmethod
        def options(klass):
            # fairseq's extra keywords are not mechanism options
            return cls.options()

        def prepare_for_onnx_export_(self):
            self.onnx_trace = True

        def _set_skip_embed_dim_check(self):
            self.skip_embed_dim_check = True

    FairseqMultiheadAttention.__name__ = cls.__name__
    FairseqMultiheadAttention.__qualname__ = cls.__qualname__
    FairseqMultiheadAttention.__doc__ = cls.__doc__
    FairseqMultiheadAttention.__module__ = cls.__module__
    return FairseqMultiheadAttention  # type: ignore[return-value]
