"""fairseq transformer layers whose attention comes from the efficient-attention registry.

The layers subclass fairseq's ``TransformerEncoderLayerBase`` /
``TransformerDecoderLayerBase`` and only override how attention modules are
built, so everything else (norms, FFN, dropout, quant-noise, incremental
state) is fairseq's own code.  The encoder / decoder subclass fairseq's
``TransformerEncoder`` / ``TransformerDecoder`` and only override
``build_*_layer``.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional

from fairseq.distributed import fsdp_wrap
from fairseq.models.transformer import TransformerDecoder, TransformerEncoder
from fairseq.models.transformer.transformer_config import TransformerConfig
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase

from efficient_attention import UnsupportedPatternError

from .options import RoleChoice, user_error

logger = logging.getLogger(__name__)

__all__ = [
    "EfficientEncoderLayer",
    "EfficientDecoderLayer",
    "EfficientTransformerEncoder",
    "EfficientTransformerDecoder",
    "build_role_attention",
]


def build_role_attention(
    choice: RoleChoice, embed_dim: int, num_heads: int, *, max_positions: Optional[int] = None, **kwargs
):
    """Build the attention module of one role; errors name the flag and the mechanism.

    ``max_positions`` (the model's longest sequence) becomes ``max_len`` of a mechanism that has that
    option (cosFormer's fixed ``M``, which decoding needs) unless ``--*-max-len`` sets it.
    """
    if max_positions is not None and "max_len" in choice.cls.options():
        if "max_len" not in choice.options:
            kwargs["max_len"] = max_positions
        elif choice.options["max_len"] is not None and choice.options["max_len"] < max_positions:
            raise user_error(
                ValueError(
                    f"{choice.role.flag} {choice.name}: max_len={choice.options['max_len']} is shorter than the "
                    f"model's {max_positions} positions (--tokens-per-sample / --max-*-positions); "
                    f"raise --attn-max-len or drop it"
                )
            )
    # The registry class itself: it has fairseq's constructor, forward and incremental-state
    # protocol; the layers never pass fairseq's dictionary / xformers keywords (xformers configs are
    # rejected by the layers).
    pattern = choice.role.pattern
    try:
        return choice.cls(embed_dim, num_heads, cross=pattern.cross, causal=pattern.causal, **kwargs, **choice.options)
    except UnsupportedPatternError as err:
        raise user_error(err) from err
    except (TypeError, ValueError) as err:
        raise user_error(type(err)(f"{choice.role.flag} {choice.name} ({choice.describe()}): {err}")) from None


def _max_positions(*values) -> Optional[int]:
    """The largest of fairseq's ``max_*_positions`` that are set (positive ints), else ``None``."""
    ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return max(ints) if ints else None


def _with_checkpointing(layer, cfg):
    """fairseq's activation checkpointing / FSDP wrapping of a layer (as in its ``build_*_layer``)."""
    checkpoint = cfg.checkpoint_activations
    if checkpoint:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap if not checkpoint else 0)


class EfficientEncoderLayer(TransformerEncoderLayerBase):
    """fairseq's encoder layer with the self-attention of ``choices['encoder']`` (noncausal self)."""

    def __init__(self, cfg, choices: Dict[str, RoleChoice], return_fc: bool = False):
        self.attention_choices = choices  # read by build_self_attention during super().__init__
        super().__init__(cfg, return_fc=return_fc)

    def build_self_attention(self, embed_dim, cfg):
        if cfg.encoder.xformers_att_config is not None:
            raise ValueError("--encoder-xformers-att-config cannot be combined with efficient-attention mechanisms")
        return build_role_attention(
            self.attention_choices["encoder"],
            embed_dim,
            cfg.encoder.attention_heads,
            dropout=cfg.attention_dropout,
            self_attention=True,
            max_positions=_max_positions(cfg.max_source_positions),
            q_noise=self.quant_noise,
            qn_block_size=self.quant_noise_block_size,
        )


class EfficientDecoderLayer(TransformerDecoderLayerBase):
    """fairseq's decoder layer: causal self-attention of ``choices['decoder']``, cross of ``choices['cross']``.

    fairseq asks the last layer's cross attention for its weights (alignment,
    ``need_attn`` in evaluation).  A cross mechanism that cannot return
    weights (``capabilities.need_weights`` False) is called with
    ``need_weights=False`` and the layer returns ``None`` for the attention,
    which is fairseq's "no attention available" (so ``--print-alignment`` is
    unavailable for such models).
    """

    def __init__(
        self, cfg, choices: Dict[str, RoleChoice], no_encoder_attn=False, add_bias_kv=False, add_zero_attn=False
    ):
        self.attention_choices = choices
        if cfg.cross_self_attention:
            raise ValueError("--cross-self-attention is not supported with efficient-attention mechanisms")
        super().__init__(cfg, no_encoder_attn=no_encoder_attn, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
        self.cross_weights = no_encoder_attn or choices["cross"].capabilities.need_weights
        if not self.cross_weights:
            self.need_attn = False

    def build_self_attention(self, embed_dim, cfg, add_bias_kv=False, add_zero_attn=False):
        if cfg.decoder.xformers_att_config is not None:
            raise ValueError("--decoder-xformers-att-config cannot be combined with efficient-attention mechanisms")
        return build_role_attention(
            self.attention_choices["decoder"],
            embed_dim,
            cfg.decoder.attention_heads,
            dropout=cfg.attention_dropout,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            self_attention=True,
            max_positions=_max_positions(cfg.max_target_positions),
            q_noise=self.quant_noise,
            qn_block_size=self.quant_noise_block_size,
        )

    def build_encoder_attention(self, embed_dim, cfg):
        return build_role_attention(
            self.attention_choices["cross"],
            embed_dim,
            cfg.decoder.attention_heads,
            kdim=cfg.encoder.embed_dim,
            vdim=cfg.encoder.embed_dim,
            dropout=cfg.attention_dropout,
            encoder_decoder_attention=True,
            q_noise=self.quant_noise,
            qn_block_size=self.quant_noise_block_size,
            max_positions=_max_positions(cfg.max_source_positions, cfg.max_target_positions),
        )

    def forward(
        self,
        x,
        encoder_out=None,
        encoder_padding_mask=None,
        incremental_state=None,
        prev_self_attn_state=None,
        prev_attn_state=None,
        self_attn_mask=None,
        self_attn_padding_mask=None,
        need_attn: bool = False,
        need_head_weights: bool = False,
    ):
        if not self.cross_weights:
            need_attn = need_head_weights = False
        if self_attn_mask is not None and self.self_attn.causal:
            # fairseq's decoder passes only its buffered future mask here (cross-self-attention is
            # rejected above); a causal module applies it itself, fused, without checking a (T, T) mask
            if self_attn_mask.shape != (x.shape[0], x.shape[0]):
                raise ValueError(f"self_attn_mask of shape {tuple(self_attn_mask.shape)} is not the future mask")
            self_attn_mask = None
        return super().forward(
            x,
            encoder_out,
            encoder_padding_mask,
            incremental_state,
            prev_self_attn_state,
            prev_attn_state,
            self_attn_mask,
            self_attn_padding_mask,
            need_attn=need_attn,
            need_head_weights=need_head_weights,
        )

    def make_generation_fast_(self, need_attn: bool = False, **kwargs):
        self.need_attn = need_attn and self.cross_weights


class EfficientTransformerEncoder(TransformerEncoder):
    """fairseq's ``TransformerEncoder`` built from :class:`EfficientEncoderLayer`."""

    def __init__(self, args, dictionary, embed_tokens, choices: Dict[str, RoleChoice], return_fc=False):
        self.attention_choices = choices
        super().__init__(args, dictionary, embed_tokens, return_fc=return_fc)

    def build_encoder_layer(self, args):
        cfg = TransformerConfig.from_namespace(args)
        return _with_checkpointing(EfficientEncoderLayer(cfg, self.attention_choices, return_fc=self.return_fc), cfg)


class EfficientTransformerDecoder(TransformerDecoder):
    """fairseq's ``TransformerDecoder`` built from :class:`EfficientDecoderLayer`.

    Beam search runs on the mechanisms' incremental decoding.  When a
    mechanism of the decoder has no incremental decoding
    (``capabilities.incremental`` False), the decoder ignores
    ``incremental_state`` and recomputes the whole prefix at every step: the
    same result, at O(T) cost per step instead of the cache's.
    """

    def __init__(
        self,
        args,
        dictionary,
        embed_tokens,
        choices: Dict[str, RoleChoice],
        no_encoder_attn=False,
        output_projection=None,
    ):
        self.attention_choices = choices
        roles = ("decoder",) if no_encoder_attn else ("decoder", "cross")
        self.cached_decoding = all(choices[r].capabilities.incremental for r in roles)
        super().__init__(
            args, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn, output_projection=output_projection
        )
        if not self.cached_decoding:
            logger.info(
                "decoder mechanisms without incremental decoding (%s): generation recomputes the prefix each step",
                ", ".join(choices[r].name for r in roles if not choices[r].capabilities.incremental),
            )

    def build_decoder_layer(self, args, no_encoder_attn=False):
        cfg = TransformerConfig.from_namespace(args)
        return _with_checkpointing(EfficientDecoderLayer(cfg, self.attention_choices, no_encoder_attn), cfg)

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state: Optional[Dict] = None, **kwargs):
        if not self.cached_decoding:
            incremental_state = None
        return super().forward(
            prev_output_tokens, encoder_out=encoder_out, incremental_state=incremental_state, **kwargs
        )
