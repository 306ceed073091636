"""The contract every attention mechanism implements.

:class:`EfficientAttention` has fairseq's ``MultiheadAttention`` constructor and
forward signature.  It owns everything that is the same for every mechanism:

* argument checking (shapes, dtypes, devices, masks) with errors that name the
  argument;
* the projections ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` (named as
  in fairseq, so checkpoints load, including the legacy ``in_proj_weight``);
* ``batch_first``, ``query_padding_mask``, head splitting and weight formatting;
* fairseq's incremental-state protocol (``_get_input_buffer``,
  ``_set_input_buffer``, ``reorder_incremental_state``, ``set_beam_size``),
  keyed per module instance, and a key/value cache for decoding;
* capability checks: a mechanism declares what it supports in
  :class:`~efficient_attention.capabilities.Capabilities` and the base rejects
  anything else with a clear message.

A mechanism subclasses it, declares ``capabilities``, declares its own options
as a dataclass (``Options``, see :mod:`efficient_attention.options`; the base
checks them and sets them as attributes) and implements
:meth:`EfficientAttention._attend` on per-head tensors.  Mechanisms
whose decoding state must not grow override :meth:`_attend_step`.

Decoding state (one dict per module in fairseq's ``incremental_state``).  Every
tensor in it has the batch as dim 0 (beam search reorders it); ints are the
same for every batch row.  The keys:

* ``position`` (int): queries decoded before this call.  Kept by the base for
  mechanisms with their own state and for causal cross decoding (no device
  sync); mechanisms read it as ``masks.query_offset``.
* ``prev_key`` / ``prev_value`` ``(B, Hkv, S, d)`` and ``prev_key_padding_mask``
  ``(B, S)`` bool or None: fairseq's names for the cached keys -- the base's
  key/value cache, the bounded window of :meth:`_window_cache`, or, with
  ``static_kv``, what :meth:`_static_kv` stored (the keys or a summary of them).
  ``prev_key`` present means "static keys cached": fairseq then passes none.
* ``prev_query`` / ``prev_query_padding_mask``: the base's noncausal recompute.
* anything else is a mechanism's own state (``kv_sum``, ``ssm_state``, ...),
  named in its ``_attend_step`` docstring.
"""

from __future__ import annotations

import inspect
import logging
import math
import typing
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capabilities import Capabilities, Pattern, UnsupportedInputError, UnsupportedPatternError
from .functional import merge_heads, split_heads
from .masks import as_bool_mask, check_attn_mask, check_key_padding_mask, expand_attn_mask, is_causal_mask, to_additive
from .options import AttentionOptions, Option, check_bool, check_int, did_you_mean, option_specs
from .quant_noise import check_quant_noise, quant_noise_weight

logger = logging.getLogger(__name__)

# Devices where self attention takes q, k, v from one batched product (EfficientAttention._project_qkv).  On a GPU
# below 8k tokens a training step is host-bound and the one product saves ~35 ATen ops; on the CPU three
# projections are faster (2 threads, N = 4096, fp32: a module's forward + backward 10-20% slower with the batched
# product, whose expanded input MKL does not take as a plain matrix).
FUSED_PROJECTION_DEVICES: Tuple[str, ...] = ("cuda",)

__all__ = ["EfficientAttention", "AttentionMasks", "OptionSpec", "IncrementalState", "check_bool"]

IncrementalState = Dict[str, Dict[str, Optional[Tensor]]]


@dataclass(frozen=True)
class AttentionMasks:
    """The masks a mechanism receives, already checked and laid out.

    Attributes:
        key_padding: ``(B, S)``; bool (True = padding) or, for mechanisms with
            ``additive_masks``, float additive.  ``S`` counts cached keys too.
        attn: ``(1, 1, T, S)`` or ``(B, H, T, S)``; bool (True = masked) or
            additive float (only for mechanisms with ``additive_masks``).
        query_padding: ``(B, T)`` bool, True = padded query (its output is
            zeroed by the base; mechanisms may also use it, e.g. to keep padded
            positions out of landmarks).
        query_offset: ``S - T``: the queries are the last ``T`` of the ``S``
            key positions (bottom-right alignment), so with ``causal`` query
            ``i`` sees key ``j`` iff ``j <= i + query_offset``.  In
            :meth:`EfficientAttention._attend_step`: the position of the first
            new query (the queries decoded before).
    """

    key_padding: Optional[Tensor] = None
    attn: Optional[Tensor] = None
    query_padding: Optional[Tensor] = None
    query_offset: int = 0


OptionSpec = Option  # the name the registry and the plugins have always used

# The constructor arguments every mechanism shares (fairseq's, plus ours).
_BASE_OPTIONS = frozenset({"cross", "causal", "num_kv_heads"})
_NUM_KV_HEADS = Option(
    "num_kv_heads", None, Optional[int], "key/value heads (multi-query: 1; grouped: a divisor of num_heads)", minimum=1
)


class EfficientAttention(nn.Module):
    """Multi-head attention with fairseq's interface; subclass it to add a mechanism.

    Args:
        embed_dim: model dimension ``C`` (query features).
        num_heads: number of heads ``H``; must divide ``embed_dim``.
        kdim, vdim: key / value features (default ``embed_dim``).
        dropout: attention dropout probability (where the mechanism applies it).
        bias: biases in the projections.
        add_bias_kv, add_zero_attn: fairseq's extra learned / zero key-value
            (only mechanisms with the ``bias_kv`` capability).
        self_attention: keys and values are projected from the query (fairseq).
        encoder_decoder_attention: fairseq's cross attention flag.
        q_noise, qn_block_size: quantization noise on the projections.
        cross: build the cross-attention pattern (default: ``encoder_decoder_attention``).
        causal: build the causal pattern.
        num_kv_heads: key/value heads for multi-query / grouped-query attention
            (only mechanisms with the ``grouped_kv`` capability).
        **options: the mechanism's own options, the fields of its ``Options``
            dataclass (:mod:`efficient_attention.options`); each is checked
            against its declared rule and set as an attribute.
    """

    if TYPE_CHECKING:  # options are set from the spec with setattr: to the type checker any attribute is Any

        def __getattr__(self, name: str) -> Any: ...

    capabilities: ClassVar[Capabilities] = Capabilities()
    Options: ClassVar[type] = AttentionOptions  # the mechanism's options dataclass (efficient_attention.options)
    # True for a mixer of the query sequence alone (S4D): the key and value projections are not computed
    ignores_key_value: ClassVar[bool] = False
    # False where the backward keeps only some of q, k, v: one batched product (_project_qkv) gives the three one
    # storage, so a saved view of one keeps all three alive (one more (L, B, C) tensor at peak in training)
    fused_projections: ClassVar[bool] = True
    option_help: ClassVar[Mapping[str, str]] = {}  # help of options declared the old way (keyword-only arguments)
    attention_name: ClassVar[Optional[str]] = None  # set by @register_attention

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        self_attention: bool = False,
        encoder_decoder_attention: bool = False,
        q_noise: float = 0.0,
        qn_block_size: int = 8,
        *,
        cross: Optional[bool] = None,
        causal: bool = False,
        num_kv_heads: Optional[int] = None,
        **options,
    ):
        super().__init__()
        name = type(self).__name__
        self._check_option_names(options)  # first, as Python does for an unexpected keyword
        check_int(embed_dim, "embed_dim", 1)
        check_int(num_heads, "num_heads", 1)
        if embed_dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide embed_dim ({embed_dim})")
        self.kdim = embed_dim if kdim is None else check_int(kdim, "kdim", 1)
        self.vdim = embed_dim if vdim is None else check_int(vdim, "vdim", 1)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        bias, add_bias_kv, add_zero_attn = (
            check_bool(bias, "bias"),
            check_bool(add_bias_kv, "add_bias_kv"),
            check_bool(add_zero_attn, "add_zero_attn"),
        )
        self_attention = check_bool(self_attention, "self_attention")
        encoder_decoder_attention = check_bool(encoder_decoder_attention, "encoder_decoder_attention")
        causal = check_bool(causal, "causal")
        if self_attention and encoder_decoder_attention:
            raise ValueError("self_attention and encoder_decoder_attention cannot both be True")
        self.qkv_same_dim = self.kdim == embed_dim and self.vdim == embed_dim
        if self_attention and not self.qkv_same_dim:
            raise ValueError(
                f"self_attention=True needs kdim == vdim == embed_dim, got kdim={self.kdim}, "
                f"vdim={self.vdim}, embed_dim={embed_dim}"
            )
        caps = self.capabilities
        cross_given = cross
        if cross is None:
            # fairseq's module built with neither flag is general attention: with kdim / vdim of their own the
            # keys cannot be the query, so they come from another sequence (cross) when the mechanism has it
            general = not (self_attention or encoder_decoder_attention or self.qkv_same_dim)
            cross = encoder_decoder_attention or (general and caps.supports(Pattern.of(cross=True, causal=causal)))
        cross = check_bool(cross, "cross")
        if self_attention and cross:
            raise ValueError("self_attention=True projects keys from the query; it cannot be combined with cross=True")
        self.pattern = Pattern.of(cross=cross, causal=causal)
        if not caps.supports(self.pattern):
            raise UnsupportedPatternError(
                f"{name} does not support {self.pattern} attention "
                f"(cross={cross}, causal={causal}); it supports: {', '.join(caps.pattern_names())}"
            )
        if (add_bias_kv or add_zero_attn) and not caps.bias_kv:
            raise ValueError(f"{name} does not support add_bias_kv / add_zero_attn")
        num_kv_heads = num_heads if num_kv_heads is None else check_int(num_kv_heads, "num_kv_heads", 1)
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        if num_kv_heads != num_heads and not caps.grouped_kv:
            raise ValueError(f"{name} does not support num_kv_heads != num_heads (grouped-query attention)")

        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout_p = float(dropout)
        self.self_attention = self_attention
        self.encoder_decoder_attention = encoder_decoder_attention
        self.cross = cross
        self.causal = causal
        self.add_zero_attn = add_zero_attn
        self._general = cross_given is None and not (self_attention or encoder_decoder_attention)
        self.beam_size = 1
        kv_dim = num_kv_heads * self.head_dim
        check_quant_noise(q_noise, qn_block_size, embed_dim, "q_proj/out_proj")
        check_quant_noise(q_noise, qn_block_size, self.kdim, "k_proj")
        check_quant_noise(q_noise, qn_block_size, self.vdim, "v_proj")
        self.q_noise, self.qn_block_size = float(q_noise), int(qn_block_size)
        self.k_proj = nn.Linear(self.kdim, kv_dim, bias=bias)
        self.v_proj = nn.Linear(self.vdim, kv_dim, bias=bias)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.bias_k: Optional[nn.Parameter]
        self.bias_v: Optional[nn.Parameter]
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, kv_dim))
            self.bias_v = nn.Parameter(torch.empty(1, 1, kv_dim))
        else:
            self.bias_k = self.bias_v = None
        self._set_options(options)
        self.init_incremental_state()
        self.reset_parameters()

    # ------------------------------------------------------------------ setup
    def reset_parameters(self) -> None:
        """fairseq's initialisation (scaled Xavier when q/k/v share a dimension)."""
        gain = 1 / math.sqrt(2) if self.qkv_same_dim else 1.0
        for proj in (self.k_proj, self.v_proj, self.q_proj):
            nn.init.xavier_uniform_(proj.weight, gain=gain)
        nn.init.xavier_uniform_(self.out_proj.weight)
        if self.out_proj.bias is not None:
            nn.init.constant_(self.out_proj.bias, 0.0)
        for bias in (self.bias_k, self.bias_v):  # both or neither (add_bias_kv)
            if bias is not None:
                nn.init.xavier_normal_(bias)

    @classmethod
    def options(cls) -> Dict[str, Option]:
        """The mechanism's own constructor options (beyond the shared ones), by name.

        The fields of ``cls.Options``; also options declared the old way, as keyword-only
        arguments of a subclass's ``__init__`` documented in ``option_help`` (those have no rule
        here: their constructor checks them); and ``num_kv_heads`` for ``grouped_kv`` mechanisms.
        """
        specs: Dict[str, Option] = {}
        for klass in reversed(cls.__mro__):
            if not (isinstance(klass, type) and issubclass(klass, EfficientAttention)) or klass is EfficientAttention:
                continue
            if "__init__" not in vars(klass):
                continue
            hints = typing.get_type_hints(klass.__init__)
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name in _BASE_OPTIONS:
                    continue
                help_text = cls.option_help.get(p.name)
                if help_text is None:
                    raise TypeError(f"{cls.__name__}.option_help has no entry for option {p.name!r}")
                specs[p.name] = Option(p.name, p.default, hints.get(p.name, type(p.default)), help_text)
        specs.update(option_specs(cls.Options))
        if cls.capabilities.grouped_kv:
            specs["num_kv_heads"] = _NUM_KV_HEADS
        return specs

    @classmethod
    def _check_option_names(cls, given: Mapping[str, Any]) -> None:
        """``TypeError`` (with the closest name) for a keyword that is no option of ``cls.Options``."""
        declared = option_specs(cls.Options)
        for key in given:
            if key not in declared:
                known = [*inspect.signature(EfficientAttention.__init__).parameters][1:-1] + [*cls.options()]
                raise TypeError(
                    f"{cls.__name__} got an unexpected option {key!r}{did_you_mean(key, known)}; "
                    f"its options: {', '.join(cls.options()) or 'none'}"
                )

    def _set_options(self, given: Dict[str, Any]) -> None:
        """Check the values of the options of ``cls.Options`` and set each as an attribute (defaults if not given)."""
        cls = type(self)
        declared = option_specs(cls.Options)
        config = cls.Options(**given)
        for key in declared:
            setattr(self, key, getattr(config, key))

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.options() if hasattr(self, k))
        base = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, pattern='{self.pattern}'"
        return base + (", " + opts if opts else "")

    # -------------------------------------------------- incremental state API
    def init_incremental_state(self) -> None:
        self._incremental_state_id = str(uuid.uuid4())

    def __setstate__(self, state):
        # copies (deepcopy, pickling) get their own key so their caches never collide
        super().__setstate__(state)
        self.init_incremental_state()

    def _full_key(self, key: str) -> str:
        return f"{self._incremental_state_id}.{key}"

    def get_incremental_state(self, incremental_state: Optional[IncrementalState], key: str):
        if incremental_state is None:
            return None
        return incremental_state.get(self._full_key(key))

    def set_incremental_state(self, incremental_state: Optional[IncrementalState], key: str, value):
        if incremental_state is not None:
            incremental_state[self._full_key(key)] = value
        return incremental_state

    def _get_input_buffer(self, incremental_state: Optional[IncrementalState]) -> Dict[str, Optional[Tensor]]:
        result = self.get_incremental_state(incremental_state, "attn_state")
        return result if result is not None else {}

    def _set_input_buffer(self, incremental_state: Optional[IncrementalState], buffer: Dict[str, Optional[Tensor]]):
        return self.set_incremental_state(incremental_state, "attn_state", buffer)

    def reorder_incremental_state(self, incremental_state: Optional[IncrementalState], new_order: Tensor):
        """Reorder the cache for beam search: every buffer tensor has batch as dim 0 (ints are positions)."""
        buffer = self._get_input_buffer(incremental_state)
        if buffer:
            for k, v in buffer.items():
                if isinstance(v, Tensor):
                    buffer[k] = v.index_select(0, new_order)
            self._set_input_buffer(incremental_state, buffer)
        return incremental_state

    def set_beam_size(self, beam_size: int) -> None:
        self.beam_size = beam_size

    # ------------------------------------------------------ checkpoint loading
    def upgrade_state_dict_named(self, state_dict, name: str) -> None:
        """Split fairseq's legacy ``in_proj_weight`` / ``in_proj_bias`` into q/k/v."""
        prefix = name + "." if name else ""
        _split_in_proj(state_dict, prefix)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _split_in_proj(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor] = None,
        value: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[IncrementalState] = None,
        need_weights: bool = True,
        static_kv: bool = False,
        attn_mask: Optional[Tensor] = None,
        before_softmax: bool = False,
        need_head_weights: bool = False,
        *,
        query_padding_mask: Optional[Tensor] = None,
        batch_first: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Attend from ``query`` to ``key`` / ``value``.

        Args:
            query: ``(T, B, C)`` (or ``(B, T, C)`` with ``batch_first``).
            key, value: ``(S, B, kdim)`` / ``(S, B, vdim)``; default to ``query``
                for self attention; ``None`` with ``static_kv`` once cached.
            key_padding_mask: ``(B, S)``; bool/uint8 (True = padding) or float additive.
            incremental_state: fairseq's decoding cache (dict), updated in place.
            need_weights: return attention weights averaged over heads, ``(B, T, S)``.
            static_kv: cross attention whose keys/values are computed once and cached.
            attn_mask: ``(T, S)`` or ``(B*H, T, S)`` (batch-major); bool (True =
                masked) or float additive.
            before_softmax: return ``(raw scores (B*H, T, S), values (B*H, S, d))``.
            need_head_weights: return per-head weights ``(H, B, T, S)``.
            query_padding_mask: ``(B, T)`` bool; padded query rows of the output
                (and of the weights) are zero.
            batch_first: inputs and output are ``(B, L, C)``.

        Returns:
            ``(attn, attn_weights)``: ``attn`` shaped like ``query``;
            ``attn_weights`` as requested or ``None``.
        """
        name = type(self).__name__
        caps = self.capabilities
        if need_head_weights:
            need_weights = True
        keys_are_query = self.self_attention or ((key is None or key is query) and (value is None or value is query))
        if batch_first:
            # a query that is not a Tensor goes on to _check_inputs' TypeError
            query = query.transpose(0, 1) if isinstance(query, Tensor) else query
            key, value = (None if x is None else x.transpose(0, 1) for x in (key, value))
        self._check_inputs(query, key, value)
        tgt_len, bsz, _ = query.shape
        if need_weights and not caps.need_weights:
            raise UnsupportedInputError(f"{name} cannot return attention weights; call it with need_weights=False")
        if before_softmax and not caps.before_softmax:
            raise UnsupportedInputError(f"{name} does not support before_softmax=True")
        if static_kv and not self.cross:
            raise ValueError("static_kv=True needs cross attention (cross=True or encoder_decoder_attention=True)")

        # fairseq caches keys for any attention given an incremental_state (see _decode_kind)
        decoding = incremental_state is not None
        if decoding and self._decode_kind(static_kv) == "mechanism" and not caps.incremental:
            raise UnsupportedInputError(f"{name} does not support incremental decoding (incremental_state)")
        if decoding and before_softmax:
            raise UnsupportedInputError("before_softmax=True cannot be combined with incremental_state")
        state: Optional[Dict[str, Any]] = self._get_input_buffer(incremental_state) if decoding else None
        cached_static = static_kv and state is not None and "prev_key" in state

        # projections
        one_step = state is not None and tgt_len == 1 and keys_are_query and self._stacks_projections()
        k: Optional[Tensor]
        v: Optional[Tensor]
        fused = not one_step and keys_are_query and self._fuses_projections(query)
        if one_step:  # a decoding step of self attention: q, k, v from one product
            q, k, v = self._project_step(query)
        elif fused:  # self attention's q, k, v from one batched product
            q, k, v = self._project_qkv(query)
        else:
            q = split_heads(self._project(self.q_proj, query), self.num_heads)
        if self.self_attention:
            key = value = query
        elif key is None and not cached_static:
            if self.cross:
                raise ValueError(f"{name} is a cross attention: pass key and value")
            key = value = query
        if cached_static:
            # keys, values and their padding come from the cache; fairseq passes the
            # encoder output and its padding mask again at every step: they are not used
            assert state is not None  # cached_static implies a decoding state
            k = v = key_padding_mask = None
            src_new = state["prev_key"].shape[2]
        else:
            assert key is not None and value is not None  # given, or the query's (set above)
            if one_step or fused:
                pass  # projected above
            elif self.ignores_key_value and keys_are_query:
                k = v = q  # never read: the query's projection stands in (two products and their ops saved)
            else:
                k = split_heads(self._project(self.k_proj, key), self.num_kv_heads)
                v = split_heads(self._project(self.v_proj, value), self.num_kv_heads)
            assert k is not None
            src_new = k.shape[2]
            if not self.cross and src_new != tgt_len and not self._general_keys():
                raise ValueError(
                    f"self attention needs as many keys as queries: query has {tgt_len} positions, key {src_new} "
                    f"(build it with cross=True for keys from another sequence)"
                )
        key_padding_mask = check_key_padding_mask(key_padding_mask, bsz, src_new, query.device)
        if key_padding_mask is not None and not caps.key_padding_mask:
            raise UnsupportedInputError(f"{name} does not support key_padding_mask")
        if query_padding_mask is not None:
            query_padding_mask = check_key_padding_mask(query_padding_mask, bsz, tgt_len, query.device)
            query_padding_mask = as_bool_mask(query_padding_mask, "query_padding_mask")
        masks = AttentionMasks(key_padding=key_padding_mask, query_padding=query_padding_mask)

        if before_softmax:
            assert k is not None and v is not None  # no incremental_state with before_softmax: projected above
            scores, v_out = self._scores(
                q, k, v, self._prepare_masks(masks, attn_mask, bsz, tgt_len, src_new, query.device)
            )
            return scores.reshape(bsz * self.num_heads, tgt_len, -1), v_out.reshape(
                bsz * self.num_heads, -1, v_out.shape[-1]
            )

        src_len = src_new if not decoding or static_kv else src_new + _cached_len(state)
        if bsz == 0 or tgt_len == 0 or (src_len == 0 and not self._has_extra_kv()):
            # nothing to compute (no query, or no key to see: the output is 0 before out_proj); the state is untouched
            out = q.new_zeros(bsz, self.num_heads, tgt_len, self.head_dim)
            weights = q.new_zeros(bsz, self.num_heads, tgt_len, src_len) if need_weights else None
        elif state is not None:  # decoding
            out, weights = self._decode(q, k, v, state, masks, attn_mask, need_weights, static_kv)
            self._set_input_buffer(incremental_state, state)
        else:
            assert k is not None and v is not None  # not decoding: projected above
            masks = self._prepare_masks(masks, attn_mask, bsz, tgt_len, src_new, query.device)
            out, weights = self._attend(q, k, v, masks, need_weights)

        # the projections are not read again: what the mechanism did not keep for its backward is freed before the
        # output projection (causal ABC keeps contiguous copies, so q, k, v were 3 of its forward peak's units)
        del q, k, v
        attn = self._project(self.out_proj, merge_heads(out))
        if query_padding_mask is not None:
            attn = attn.masked_fill(query_padding_mask.t().unsqueeze(-1), 0.0)
            if weights is not None:
                weights = weights.masked_fill(query_padding_mask[:, None, :, None], 0.0)
        if batch_first:
            attn = attn.transpose(0, 1)
        if not need_weights or weights is None:
            return attn, None
        weights = weights.transpose(0, 1)  # (H, B, T, S)
        return attn, (weights if need_head_weights else weights.mean(dim=0))

    # ---------------------------------------------------------------- decoding
    def _decode(
        self,
        q: Tensor,
        k: Optional[Tensor],
        v: Optional[Tensor],
        state: Dict[str, Any],
        masks: AttentionMasks,
        attn_mask: Optional[Tensor],
        need_weights: bool,
        static_kv: bool,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """One call with ``incremental_state``: the masks prepared once, then the path of :meth:`_decode_kind`."""
        masks, attn_mask = self._decoding_masks(masks, attn_mask, q.shape[2])
        kind = self._decode_kind(static_kv)
        if kind == "causal_static":
            return self._decode_causal_static(q, k, v, state, masks, attn_mask, need_weights)
        if kind == "noncausal":
            assert k is not None and v is not None  # no static_kv: every step brings its keys
            return self._decode_noncausal(q, k, v, state, masks, attn_mask, need_weights)
        if not self._own_decoding_state():
            return self._decode_cached(q, k, v, state, masks, attn_mask, need_weights, static_kv)
        position = state.get("position", 0)
        out = self._attend_step(q, k, v, state, replace(masks, query_offset=position))
        state["position"] = position + q.shape[2]
        return out, None

    @classmethod
    def _own_decoding_state(cls) -> bool:
        """The mechanism overrides :meth:`_attend_step` (else the base's key/value cache and :meth:`_attend`)."""
        return cls._attend_step is not EfficientAttention._attend_step

    def _decode_kind(self, static_kv: bool) -> str:
        """How a call with ``incremental_state`` is decoded.

        * ``"mechanism"``: causal attention with keys arriving step by step, or
          noncausal cross attention over static keys -- the mechanism's
          :meth:`_attend_step` (its own, possibly constant, state);
        * ``"causal_static"``: causal cross attention over static keys -- the base
          caches the keys and the position of the next query, so query ``p`` sees
          keys ``0..p`` as in the full pass (:meth:`_decode_causal_static`);
        * ``"noncausal"``: noncausal attention with keys arriving step by step
          (fairseq's decoder self attention built without ``causal``): the new
          queries see every cached key, as fairseq's module does
          (:meth:`_decode_noncausal`).
        """
        if self.causal:
            return "causal_static" if static_kv else "mechanism"
        return "mechanism" if static_kv else "noncausal"

    def _general_keys(self) -> bool:
        """Built with neither fairseq flag nor ``cross`` (general attention) and able to take any key set."""
        return getattr(self, "_general", False) and not self.causal and self.capabilities.independent_queries

    def _has_extra_kv(self) -> bool:
        return self.bias_k is not None or self.add_zero_attn

    def _decode_causal_static(
        self,
        q: Tensor,
        k: Optional[Tensor],
        v: Optional[Tensor],
        state: Dict[str, Any],
        masks: AttentionMasks,
        attn_mask: Optional[Tensor],
        need_weights: bool,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Causal cross decoding over static keys: the new queries are at positions ``p .. p + T - 1``.

        The full pass aligns query ``i`` with key ``i`` (``T == S``; see
        :mod:`efficient_attention.masks`), so query ``p`` sees keys ``0..p``: the
        keys are cut to ``p + T`` and the mechanism's own causal rule does the
        rest.  ``p`` is a Python int in the state (no device sync; beam reorder
        keeps it).
        """
        self._static_kv(state, k, v, masks.key_padding)
        k, v, kpm = state["prev_key"], state["prev_value"], state["prev_key_padding_mask"]
        bsz, tgt_len, src_len = q.shape[0], q.shape[2], k.shape[2]
        pos = state.get("position", 0)
        state["position"] = pos + tgt_len
        rows = [(0, tgt_len)] if tgt_len == 1 or pos + tgt_len <= src_len else [(t, t + 1) for t in range(tgt_len)]
        outs, weights = [], []
        for start, stop in rows:
            end = min(pos + stop, src_len)  # the keys the last of these queries sees
            sub_mask = None if attn_mask is None else attn_mask[..., start:stop, :end]
            sub = replace(masks, key_padding=None if kpm is None else kpm[:, :end])
            sub = self._prepare_masks(sub, sub_mask, bsz, stop - start, end, q.device)
            out, w = self._attend(q[:, :, start:stop], k[:, :, :end], v[:, :, :end], sub, need_weights)
            outs.append(out)
            if w is not None:
                weights.append(F.pad(w, (0, src_len - end)))
        return torch.cat(outs, dim=2), (torch.cat(weights, dim=2) if weights else None)

    def _decode_noncausal(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        state: Dict[str, Any],
        masks: AttentionMasks,
        attn_mask: Optional[Tensor],
        need_weights: bool,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Noncausal decoding: the new queries see every cached key (fairseq's ``MultiheadAttention``).

        A mechanism whose output rows depend only on their own query
        (``independent_queries``) attends the new queries to the cached keys.
        Any other gives the last ``T`` rows of its full pass over everything
        cached so far (the queries are cached too): what its full pass over the
        prefix gives, at the cost of that pass per step.
        """
        bsz, tgt_len = q.shape[0], q.shape[2]
        prev_len = _cached_len(state)
        kpm = _cat_padding(state.get("prev_key_padding_mask"), masks.key_padding, prev_len, k.shape[2], bsz)
        if prev_len:
            k = torch.cat([state["prev_key"], k], dim=2)
            v = torch.cat([state["prev_value"], v], dim=2)
        state["prev_key"], state["prev_value"], state["prev_key_padding_mask"] = k, v, kpm
        masks = replace(masks, key_padding=kpm)
        if self.capabilities.independent_queries:
            masks = self._prepare_masks(masks, attn_mask, bsz, tgt_len, k.shape[2], q.device)
            return self._attend(q, k, v, masks, need_weights)
        prev_q = state.get("prev_query")
        qpm = _cat_padding(
            state.get("prev_query_padding_mask"),
            masks.query_padding,
            0 if prev_q is None else prev_q.shape[2],
            tgt_len,
            bsz,
        )
        q_all = q if prev_q is None else torch.cat([prev_q, q], dim=2)
        state["prev_query"], state["prev_query_padding_mask"] = q_all, qpm
        if attn_mask is not None:  # rows of the earlier queries: nothing masked
            earlier = q_all.shape[2] - tgt_len
            attn_mask = F.pad(attn_mask, (0, 0, earlier, 0), value=False if attn_mask.dtype == torch.bool else 0.0)
        masks = self._prepare_masks(
            replace(masks, query_padding=qpm), attn_mask, bsz, q_all.shape[2], k.shape[2], q.device
        )
        out, weights = self._attend(q_all, k, v, masks, need_weights)
        return out[:, :, -tgt_len:], (None if weights is None else weights[:, :, -tgt_len:])

    # -------------------------------------------------------- helper methods
    def _project(self, proj: nn.Linear, x: Tensor) -> Tensor:
        weight = quant_noise_weight(proj.weight, self.q_noise, self.qn_block_size, self.training)
        return F.linear(x, weight, proj.bias)

    def _stacks_projections(self) -> bool:
        """The q, k, v projections of a decoding step may be one product: keys are the query's own features
        and no quantization noise is drawn (gradients flow through the stacking)."""
        return not self.cross and self.qkv_same_dim and not (self.training and self.q_noise > 0)

    def _fuses_projections(self, x: Tensor) -> bool:
        """Whether a training / prefill call of self attention on ``x`` takes q, k, v from one batched product
        (:meth:`_project_qkv`): on a device of :data:`FUSED_PROJECTION_DEVICES`, the three projections have one
        shape and draw no quantization noise, the mechanism reads its keys and values, and either its backward
        keeps all three (:attr:`fused_projections`) or nothing is recorded for a backward."""
        return (
            x.device.type in FUSED_PROJECTION_DEVICES
            and (self.fused_projections or not torch.is_grad_enabled())
            and self._stacks_projections()
            and self.num_kv_heads == self.num_heads
            and not self.ignores_key_value
        )

    def _project_qkv(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """q, k, v ``(B, H, L, d)`` of ``x (L, B, C)`` from one ``baddbmm`` over the stacked weights ``(3, C, C)``:
        each comes out contiguous time-first, exactly as from its own projection.  Below 8k tokens a training
        step on a GPU is host-bound (~10 us an op); this takes one product, one weight cast under autocast and
        one reduction for x's gradient where three projections take three of each (and two gradient sums)."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        length, bsz, dim = x.shape
        weight = torch.stack([p.weight for p in projs]).transpose(1, 2)  # (3, C_in, C_out)
        bias = None if self.q_proj.bias is None else torch.stack([p.bias for p in projs]).unsqueeze(1)
        device = x.device.type
        if torch.is_autocast_enabled(device) and x.dtype != torch.float64:
            # cast here: autocast would cast the expanded x below into a (3, L*B, C) copy
            dtype = torch.get_autocast_dtype(device)
            x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        rows = x.reshape(1, length * bsz, dim).expand(3, -1, -1)
        y = torch.bmm(rows, weight) if bias is None else torch.baddbmm(bias, rows, weight)
        q, k, v = y.view(3, length, bsz, -1).unbind(0)  # (one stack in the backward, not three zero-filled selects)
        return split_heads(q, self.num_heads), split_heads(k, self.num_heads), split_heads(v, self.num_heads)

    def _project_step(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """q ``(B, H, 1, d)``, k and v ``(B, Hkv, 1, d)`` of one token ``x (1, B, C)``: one product with the
        stacked projection weights and three slices of one view -- a decoding step is host-bound (~9 us per op
        on an H200), and this takes 10 ops (13 under autocast) where three projections take 18 (21).  The
        weights are stacked at every step (a few microseconds of copying): a cached copy could miss an update
        made through ``.data``, which no version counter records.  Under autocast the stacked weight is cast
        here (autocast caches casts of leaves only), so autocast casts just ``x``, as for three projections."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([p.weight for p in projs])
        bias = None if self.q_proj.bias is None else torch.cat([p.bias for p in projs])
        device = x.device.type
        if torch.is_autocast_enabled(device) and x.dtype != torch.float64:  # autocast then casts x only
            dtype = torch.get_autocast_dtype(device)
            weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
        y = F.linear(x, weight, bias)  # (1, B, (H + 2 Hkv) d)
        heads, kv_heads = self.num_heads, self.num_kv_heads
        y = y.view(x.shape[1], heads + 2 * kv_heads, 1, self.head_dim)
        return y[:, :heads], y[:, heads : heads + kv_heads], y[:, heads + kv_heads :]

    def _check_inputs(self, query: Tensor, key: Optional[Tensor], value: Optional[Tensor]) -> None:
        if not isinstance(query, Tensor):
            raise TypeError(f"query must be a Tensor, got {type(query).__name__}")
        if query.dim() != 3:
            raise ValueError(f"query must be 3-D (tgt_len, batch, embed_dim), got shape {tuple(query.shape)}")
        if query.shape[-1] != self.embed_dim:
            raise ValueError(
                f"query has {query.shape[-1]} features, expected embed_dim={self.embed_dim} "
                f"(shape {tuple(query.shape)})"
            )
        if not query.is_floating_point():
            raise TypeError(f"query must be floating point, got {query.dtype}")
        if (key is None) != (value is None):
            raise ValueError("key and value must both be given or both be None")
        if key is None:
            return
        for x, nm, dim in ((key, "key", self.kdim), (value, "value", self.vdim)):
            if not isinstance(x, Tensor):
                raise TypeError(f"{nm} must be a Tensor, got {type(x).__name__}")
            if x.dim() != 3:
                raise ValueError(f"{nm} must be 3-D (src_len, batch, features), got shape {tuple(x.shape)}")
            if x.shape[-1] != dim and not self.self_attention:
                raise ValueError(f"{nm} has {x.shape[-1]} features, expected {'kdim' if nm == 'key' else 'vdim'}={dim}")
            if x.dtype != query.dtype:
                raise TypeError(f"{nm} dtype {x.dtype} differs from query dtype {query.dtype}")
            if x.device != query.device:
                raise ValueError(f"{nm} is on {x.device}, query on {query.device}")
            if x.shape[1] != query.shape[1]:
                raise ValueError(
                    f"{nm} batch {x.shape[1]} differs from query batch {query.shape[1]} "
                    f"(shapes {tuple(x.shape)} vs {tuple(query.shape)})"
                )
        assert value is not None  # both or neither (checked above)
        if key.shape[0] != value.shape[0]:
            raise ValueError(f"key and value lengths differ: key {tuple(key.shape)}, value {tuple(value.shape)}")

    def _prepare_masks(
        self,
        masks: AttentionMasks,
        attn_mask: Optional[Tensor],
        bsz: int,
        tgt_len: int,
        src_len: int,
        device: torch.device,
    ) -> AttentionMasks:
        """Check ``attn_mask`` against the final key length and apply the capability rules."""
        caps, name = self.capabilities, type(self).__name__
        attn_mask = check_attn_mask(attn_mask, bsz, self.num_heads, tgt_len, src_len, device)
        if attn_mask is not None and not caps.attn_mask:
            if self.causal and is_causal_mask(attn_mask, tgt_len, src_len):
                attn_mask = None  # it only repeats what causal=True already does
            else:
                raise UnsupportedInputError(
                    f"{name} does not support an arbitrary attn_mask (only one that repeats the causal mask "
                    f"of a causal module)"
                )
        kpm = masks.key_padding
        if not caps.additive_masks:
            if kpm is not None:
                kpm = as_bool_mask(kpm, "key_padding_mask")
            if attn_mask is not None:
                attn_mask = as_bool_mask(attn_mask, "attn_mask")
        if attn_mask is not None:
            attn_mask = expand_attn_mask(attn_mask, bsz, self.num_heads)
        return replace(masks, key_padding=kpm, attn=attn_mask, query_offset=src_len - tgt_len)

    def _decoding_masks(
        self, masks: AttentionMasks, attn_mask: Optional[Tensor], tgt_len: int
    ) -> Tuple[AttentionMasks, Optional[Tensor]]:
        """The capability rules for a decoding call, applied once for every mechanism.

        Without ``additive_masks`` the key padding arrives as bool.  Without the
        ``attn_mask`` capability, only a mask that repeats the causal mask of a
        causal module is accepted, and it is dropped (the mechanism applies
        causality itself; its state may not even hold the keys the mask names).
        So :meth:`_attend_step` never sees an ``attn_mask``.
        """
        caps = self.capabilities
        if masks.key_padding is not None and not caps.additive_masks:
            masks = replace(masks, key_padding=as_bool_mask(masks.key_padding, "key_padding_mask"))
        if attn_mask is not None and not caps.attn_mask:
            if not (self.causal and attn_mask.dim() == 2 and is_causal_mask(attn_mask, tgt_len, attn_mask.shape[-1])):
                raise UnsupportedInputError(
                    f"{type(self).__name__} does not support an arbitrary attn_mask (only one that repeats the "
                    f"causal mask of a causal module)"
                )
            attn_mask = None
        return masks, attn_mask

    # ------------------------------------------------------- mechanism hooks
    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """The mechanism: per-head tensors in, per-head output out.

        Args:
            q: ``(B, H, T, d)`` projected queries (not yet scaled; ``self.scaling`` is ``d**-0.5``).
            k, v: ``(B, Hkv, S, d)`` projected keys and values.
            masks: checked masks, see :class:`AttentionMasks`.  With
                ``self.causal``, query ``i`` may see key ``j`` iff
                ``j <= i + masks.query_offset``.
            need_weights: also return the attention probabilities.

        Returns:
            ``(out (B, H, T, d), weights (B, H, T, S) or None)``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement _attend")

    def _scores(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks) -> Tuple[Tensor, Tensor]:
        """Raw masked scores ``(B, H, T, S)`` and values, for ``before_softmax`` (optional)."""
        raise UnsupportedInputError(f"{type(self).__name__} does not support before_softmax=True")

    def _attend_step(
        self, q: Tensor, k: Optional[Tensor], v: Optional[Tensor], state: Dict[str, Any], masks: AttentionMasks
    ) -> Tensor:
        """A mechanism's own decoding state (override it; the default is the base's key/value cache).

        Called for causal decoding (``T`` new queries and their ``T`` new keys) and, with ``causal=False``,
        for cross attention over ``static_kv`` keys (use :meth:`_static_kv`: ``k``, ``v`` are ``None``
        once the keys are cached).  ``masks`` is prepared: ``key_padding`` is the bool ``(B, T)`` padding
        of the new keys (or of the static keys on the first call) or ``None``; there is no ``attn_mask``
        (see :meth:`_decoding_masks`); ``query_offset`` is the position ``p`` of the first new query (the
        base counts it, a Python int: no device sync).  Update ``state`` in place, under the names of the
        schema in the module docstring.  Returns the output ``(B, H, T, d)`` (no weights).
        """
        raise NotImplementedError(f"{type(self).__name__} decodes with the base's key/value cache")

    def _static_kv(
        self,
        state: Dict[str, Any],
        k: Optional[Tensor],
        v: Optional[Tensor],
        key_padding: Optional[Tensor],
        summarise: Optional[Callable[[Tensor, Tensor, Optional[Tensor]], Dict[str, Any]]] = None,
    ) -> Dict[str, Any]:
        """``static_kv`` decoding: the keys cached on the first call, read back on the others; returns ``state``.

        The first call stores ``summarise(k, v, key_padding)`` (a dict holding ``prev_key``, the "cached"
        mark, and whatever else the mechanism needs), or the keys themselves as ``prev_key``,
        ``prev_value``, ``prev_key_padding_mask``.
        """
        if "prev_key" not in state:
            assert k is not None and v is not None  # the first static_kv call brings the keys (forward checks it)
            if summarise is None:
                state["prev_key"], state["prev_value"], state["prev_key_padding_mask"] = k, v, key_padding
            else:
                state.update(summarise(k, v, key_padding))
        return state

    def _window_cache(
        self, state: Dict[str, Any], k: Tensor, v: Tensor, key_padding: Optional[Tensor], keep: int
    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """A bounded key cache: the cached keys followed by the new ones, of which the last ``keep`` are cached.

        ``k, v (B, Hkv, T, d)``, ``key_padding (B, T)`` bool or ``None`` (no padding).  Returns the
        concatenation ``(k, v, key_padding)`` the new queries attend to; the padding stays ``None`` while
        no key was padded.
        """
        prev_k = state.get("prev_key")
        if prev_k is not None:
            key_padding = _cat_padding(
                state.get("prev_key_padding_mask"), key_padding, prev_k.shape[2], k.shape[2], k.shape[0]
            )
            k, v = torch.cat([prev_k, k], dim=2), torch.cat([state["prev_value"], v], dim=2)
        start = max(k.shape[2] - keep, 0)
        state["prev_key"], state["prev_value"] = k[:, :, start:], v[:, :, start:]
        state["prev_key_padding_mask"] = None if key_padding is None else key_padding[:, start:]
        return k, v, key_padding

    def _decode_cached(
        self,
        q: Tensor,
        k: Optional[Tensor],
        v: Optional[Tensor],
        state: Dict[str, Any],
        masks: AttentionMasks,
        attn_mask: Optional[Tensor],
        need_weights: bool,
        static_kv: bool,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Decoding with a key/value cache (O(S) state): :meth:`_attend` over every key so far.

        The new queries are the last ``T`` positions: causal masking follows the alignment rule of
        :mod:`efficient_attention.masks`.  With ``static_kv`` the keys are cached once.
        """
        bsz, tgt_len = q.shape[0], q.shape[2]
        if static_kv:
            self._static_kv(state, k, v, masks.key_padding)
            k, v, kpm = state["prev_key"], state["prev_value"], state["prev_key_padding_mask"]
        else:
            assert k is not None and v is not None  # no static_kv: every step brings its keys
            kpm = masks.key_padding
            prev_k = state.get("prev_key")
            if prev_k is not None:
                kpm = _cat_padding(state.get("prev_key_padding_mask"), kpm, prev_k.shape[2], k.shape[2], bsz)
                k = torch.cat([prev_k, k], dim=2)
                v = torch.cat([state["prev_value"], v], dim=2)
            state["prev_key"], state["prev_value"], state["prev_key_padding_mask"] = k, v, kpm
        masks = self._prepare_masks(replace(masks, key_padding=kpm), attn_mask, bsz, tgt_len, k.shape[2], q.device)
        return self._attend(q, k, v, masks, need_weights)


def _cached_len(state: Optional[Dict[str, Any]]) -> int:
    """Keys already in a decoding cache (0 when none)."""
    prev = None if state is None else state.get("prev_key")
    return 0 if prev is None else prev.shape[2]


def _cat_padding(
    prev: Optional[Tensor], new: Optional[Tensor], prev_len: int, new_len: int, bsz: int
) -> Optional[Tensor]:
    """Concatenate cached and new key padding masks (a missing one means 'no padding')."""
    if prev is None and new is None:
        return None
    ref = new if new is not None else prev
    assert ref is not None  # not both None (returned above)
    if prev is None:
        prev = torch.zeros(bsz, prev_len, dtype=ref.dtype, device=ref.device)
    if new is None:
        new = torch.zeros(bsz, new_len, dtype=ref.dtype, device=ref.device)
    if prev.dtype != new.dtype:  # one bool, one additive: go additive
        dtype = prev.dtype if prev.is_floating_point() else new.dtype
        prev, new = to_additive(prev, dtype), to_additive(new, dtype)
    return torch.cat([prev, new], dim=1)


def _split_in_proj(state_dict, prefix: str) -> None:
    weight = state_dict.pop(prefix + "in_proj_weight", None)
    if weight is None:
        return
    dim = weight.shape[0] // 3
    for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
        state_dict[f"{prefix}{part}.weight"] = weight[i * dim : (i + 1) * dim]
    bias = state_dict.pop(prefix + "in_proj_bias", None)
    if bias is not None:
        for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
            state_dict[f"{prefix}{part}.bias"] = bias[i * dim : (i + 1) * dim]
