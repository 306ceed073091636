"""ParaGen registration: ``EfficientTransformerEncoder`` and ``EfficientTransformerDecoder``.

The only module of the plugin that imports ParaGen.  Both classes take
ParaGen's ``TransformerEncoder`` / ``TransformerDecoder`` options plus
``attention`` (encoder), ``self_attention`` and ``cross_attention`` (decoder),
and delegate to the plain-PyTorch :class:`~efficient_transformers.EfficientEncoder`
/ :class:`~efficient_transformers.EfficientDecoder`, built when ParaGen builds
the model (``build``), which is when an unsupported pattern fails.

Decoding: in ``infer`` mode the decoder keeps an ``incremental_state`` and runs
only the new positions of the prefix ParaGen passes each step.  ParaGen's beam
searches reorder a decoder's cache through ``get_cache`` / ``set_cache``,
treating each tensor as ``(L, batch, ...)``; our cache for them is a single
``(1, batch, 1)`` tensor of batch row numbers, so after ParaGen expands or
gathers it, ``set_cache`` reads the new row order and reorders the real state
(every tensor batch-first) once, with ``index_select``.

Compatibility fix (applied on import, documented in examples/paragen/README.md):
ParaGen's samplers call ``Sampler.__init__(self, None)``; recent torch (2.13
here) has no ``torch.utils.data.Sampler.__init__``, so that call reaches
``object.__init__`` and fails.  When torch's ``Sampler`` has no ``__init__`` of its own we give it
the old one, ``__init__(self, data_source=None)``, which does nothing -- exactly
what torch 1.x had.  Nothing else in torch or ParaGen is changed.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Dict, Mapping, Optional

import torch
from paragen.modules.decoders import AbstractDecoder, register_decoder
from paragen.modules.encoders import AbstractEncoder, register_encoder
from paragen.utils.data import possible_eval
from torch.utils.data import Sampler

from .transformer import EfficientDecoder, EfficientEncoder

logger = logging.getLogger(__name__)

__all__ = ["EfficientTransformerEncoder", "EfficientTransformerDecoder", "apply_torch_compat"]


def apply_torch_compat() -> bool:
    """Restore ``Sampler.__init__(self, data_source=None)`` if torch lacks it; True if it patched."""
    if "__init__" in vars(Sampler):
        return False

    def __init__(self, data_source=None) -> None:  # the torch 1.x signature ParaGen calls
        pass

    Sampler.__init__ = __init__
    logger.info("efficient_transformers: restored torch.utils.data.Sampler.__init__(data_source=None) for ParaGen")
    return True


apply_torch_compat()


def _eval_options(value: Any) -> Any:
    """Evaluate string option values of an attention mapping as ParaGen does for top-level values."""
    if isinstance(value, Mapping):
        return {k: (v if k == "name" else possible_eval(v)) for k, v in value.items()}
    return value


def _check_config(core: type, config: Dict[str, Any], fixed: Dict[str, Any]) -> None:
    """Fail at config time on an option the core class does not take (TypeError naming it)."""
    try:
        inspect.signature(core).bind_partial(**fixed, **config)
    except TypeError as err:
        raise TypeError(f"{core.__name__}: {err}") from None


@register_encoder
class EfficientTransformerEncoder(AbstractEncoder):
    """ParaGen encoder: a transformer encoder whose self-attention is any registered mechanism.

    Options: those of ParaGen's ``TransformerEncoder`` (num_layers, d_model,
    n_head, dim_feedforward, dropout, attention_dropout, activation,
    return_seed, keep_seed_in_hidden, learn_pos, normalize_before, embed_scale,
    embed_layer_norm, max_pos) and ``attention``: a mechanism name or
    ``{name: ..., <option>: ...}`` (noncausal self pattern).
    """

    def __init__(self, num_layers: int, name: Optional[str] = None, **config):
        super().__init__(name)
        config["attention"] = _eval_options(config.get("attention"))
        _check_config(EfficientEncoder, config, dict(embed=None, padding_idx=0, num_layers=num_layers))
        self._config = dict(num_layers=num_layers, **config)
        self._d_model = config.get("d_model", inspect.signature(EfficientEncoder).parameters["d_model"].default)
        self._core: Optional[EfficientEncoder] = None

    def build(self, embed, special_tokens):
        self._core = EfficientEncoder(embed, special_tokens["pad"], **self._config)

    def _forward(self, src: torch.Tensor):
        return self._core(src)

    @property
    def d_model(self):
        return self._d_model

    @property
    def out_dim(self):
        return self._d_model


@register_decoder
class EfficientTransformerDecoder(AbstractDecoder):
    """ParaGen decoder: a transformer decoder whose attentions are any registered mechanisms.

    Options: those of ParaGen's ``TransformerDecoder`` (num_layers, d_model,
    n_head, dim_feedforward, dropout, attention_dropout, activation, learn_pos,
    normalize_before, embed_scale, embed_layer_norm, output_bias, max_pos) and
    ``self_attention`` (causal self pattern) and ``cross_attention``
    (noncausal cross pattern): a mechanism name or ``{name: ..., <option>: ...}``.

    In ``train`` / ``valid`` mode it scores whole targets; in ``infer`` mode it
    decodes incrementally (see the module docstring).
    """

    def __init__(self, num_layers: int, d_model: int, n_head: int, name: Optional[str] = None, **config):
        super().__init__(name)
        for key in ("self_attention", "cross_attention"):
            config[key] = _eval_options(config.get(key))
        fixed = dict(embed=None, padding_idx=0, num_layers=num_layers, d_model=d_model, n_head=n_head)
        _check_config(EfficientDecoder, config, fixed)
        self._config = dict(num_layers=num_layers, d_model=d_model, n_head=n_head, **config)
        self._core: Optional[EfficientDecoder] = None
        self._state: Optional[dict] = None
        self._batch = 0

    def build(self, embed, special_tokens, out_proj):
        self._core = EfficientDecoder(embed, special_tokens["pad"], out_proj=out_proj, **self._config)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, memory_padding_mask: Optional[torch.Tensor] = None):
        """Logits ``(B, T, V)``; in ``infer`` mode those of the positions new since the last call."""
        if self._mode != "infer":
            return self._core(tgt, memory, memory_padding_mask)
        if self._state is None or self._core.decoded_length(self._state) >= tgt.shape[1]:
            self._state = {}  # a new generation without reset(): start from scratch
        logits = self._core(tgt, memory, memory_padding_mask, incremental_state=self._state)
        self._batch = tgt.shape[0]
        return logits

    def reset(self, mode: str = "train"):
        self._mode = mode
        self._state = {} if mode == "infer" else None
        self._batch = 0

    def get_cache(self):
        """The batch row numbers ``(1, batch, 1)``: ParaGen's searches expand / gather them.

        Empty when nothing is being decoded incrementally (``train`` / ``valid``
        mode, or before the first step): there is nothing to reorder.
        """
        if not self._state:
            return {}
        device = self._core.out_proj.weight.device
        return {"batch_order": torch.arange(self._batch, device=device).view(1, -1, 1)}

    def set_cache(self, cache):
        """Reorder the decoding state to the rows ParaGen selected."""
        order = cache.get("batch_order")
        if order is None or not self._state:
            return
        order = order.reshape(-1)
        self._core.reorder_incremental_state(self._state, order)
        self._batch = order.numel()
