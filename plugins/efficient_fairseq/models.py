"""The fairseq models ``efficient_transformer_lm`` and ``efficient_transformer`` and their arch presets.

Arch presets are registered for every mechanism in the registry when this
module is imported:

* ``transformer_lm_<name>``: ``efficient_transformer_lm`` with
  ``--decoder-attention <name>``, for every mechanism supporting causal self
  attention;
* ``transformer_<name>``: ``efficient_transformer`` with encoder self
  attention ``<name>`` (needs noncausal self), decoder self attention
  ``<name>`` (needs causal self) and cross attention ``<name>`` if it supports
  noncausal cross attention, ``vanilla`` otherwise; registered for every
  mechanism supporting both self patterns.

Explicit ``--encoder-attention`` / ``--decoder-attention`` /
``--cross-attention`` flags override a preset.  A preset name that fairseq
already uses is skipped with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import make_dataclass
from typing import Dict

from fairseq.models import ARCH_MODEL_REGISTRY, register_model, register_model_architecture
from fairseq.models.transformer import TransformerModel
from fairseq.models.transformer.transformer_legacy import base_architecture
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture,
)

from efficient_attention import Pattern, available_attentions

from .modules import EfficientTransformerDecoder, EfficientTransformerEncoder
from .options import (
    RoleChoice,
    add_attention_args,
    check_option_flags,
    dataclass_fields,
    resolve_role,
)

logger = logging.getLogger(__name__)

__all__ = [
    "EfficientTransformerLanguageModel",
    "EfficientTransformerLanguageModelConfig",
    "EfficientTransformerModel",
    "LM_OPTION_PREFIXES",
    "MT_OPTION_PREFIXES",
    "lm_attention_choices",
    "mt_attention_choices",
]

# (field prefix, help scope) of the option flags of each model
LM_OPTION_PREFIXES = (("attn", ""),)
MT_OPTION_PREFIXES = (
    ("attn", "every role: "),
    ("encoder_attn", "encoder self-attention only (overrides --attn-*): "),
    ("decoder_attn", "decoder self-attention only (overrides --attn-*): "),
    ("cross_attn", "cross attention only (overrides --attn-*): "),
)
_MT_ROLE_PREFIXES = {"encoder": "encoder_attn", "decoder": "decoder_attn", "cross": "cross_attn"}

EfficientTransformerLanguageModelConfig = make_dataclass(
    "EfficientTransformerLanguageModelConfig",
    dataclass_fields(("decoder",), LM_OPTION_PREFIXES),
    bases=(TransformerLanguageModelConfig,),
)
EfficientTransformerLanguageModelConfig.__module__ = __name__
EfficientTransformerLanguageModelConfig.__doc__ = (
    "fairseq's TransformerLanguageModelConfig plus the decoder attention and its options (from the registry)."
)


def lm_attention_choices(cfg) -> Dict[str, RoleChoice]:
    """Resolve and check ``--decoder-attention`` and the ``--attn-*`` options of an LM config."""
    choices = {"decoder": resolve_role(cfg, "decoder", ("attn",))}
    check_option_flags(cfg, choices, "attn", {})
    return choices


def mt_attention_choices(cfg) -> Dict[str, RoleChoice]:
    """Resolve and check the three roles and their options of a translation config."""
    choices = {key: resolve_role(cfg, key, ("attn", prefix)) for key, prefix in _MT_ROLE_PREFIXES.items()}
    check_option_flags(cfg, choices, "attn", _MT_ROLE_PREFIXES)
    return choices


@register_model("efficient_transformer_lm", dataclass=EfficientTransformerLanguageModelConfig)
class EfficientTransformerLanguageModel(TransformerLanguageModel):
    """fairseq's transformer LM whose decoder self-attention is any causal-capable registered mechanism."""

    @classmethod
    def add_args(cls, parser):
        # ours first: fairseq's dataclass-derived duplicates of these flags are then skipped
        add_attention_args(parser, ("decoder",), LM_OPTION_PREFIXES)
        super().add_args(parser)

    @classmethod
    def build_model(cls, args, task):
        choices = lm_attention_choices(args)  # fails here, before anything is built or trained
        logger.info("efficient_transformer_lm: %s", choices["decoder"].describe())
        # fairseq builds the embeddings (plain, adaptive or character) and a stock decoder; the
        # decoder is then replaced by ours on the same embeddings (the stock one is discarded).
        model = super().build_model(args, task)
        model.decoder = EfficientTransformerDecoder(
            args, task.target_dictionary, model.decoder.embed_tokens, choices, no_encoder_attn=True
        )
        return model


@register_model("efficient_transformer")
class EfficientTransformerModel(TransformerModel):
    """fairseq's encoder-decoder transformer with registered mechanisms in its three attention roles."""

    @classmethod
    def add_args(cls, parser):
        add_attention_args(parser, ("encoder", "decoder", "cross"), MT_OPTION_PREFIXES)
        super().add_args(parser)

    @classmethod
    def build_model(cls, args, task):
        choices = mt_attention_choices(args)
        for choice in choices.values():
            logger.info("efficient_transformer: %s", choice.describe())
        return super().build_model(args, task)

    @classmethod
    def build_encoder(cls, args, src_dict, embed_tokens):
        return EfficientTransformerEncoder(args, src_dict, embed_tokens, mt_attention_choices(args))

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        return EfficientTransformerDecoder(
            args, tgt_dict, embed_tokens, mt_attention_choices(args), no_encoder_attn=args.no_cross_attention
        )


def _set_default(args, key: str, value: str) -> None:
    if getattr(args, key, None) is None:
        setattr(args, key, value)


def efficient_lm_architecture(args):
    """fairseq's base LM sizes; ``--arch efficient_transformer_lm`` itself takes the dataclass defaults."""
    _set_default(args, "decoder_attention", "vanilla")
    base_lm_architecture(args)


@register_model_architecture("efficient_transformer", "efficient_transformer")
def efficient_transformer_architecture(args):
    for key in ("encoder", "decoder", "cross"):
        _set_default(args, f"{key}_attention", "vanilla")
    base_architecture(args)


def _lm_preset(name: str):
    def arch(args):
        _set_default(args, "decoder_attention", name)
        efficient_lm_architecture(args)

    arch.__name__ = f"transformer_lm_{name}"
    arch.__doc__ = f"efficient_transformer_lm with --decoder-attention {name} (fairseq's base LM sizes)."
    return arch


def _mt_preset(name: str, cross: str):
    def arch(args):
        _set_default(args, "encoder_attention", name)
        _set_default(args, "decoder_attention", name)
        _set_default(args, "cross_attention", cross)
        efficient_transformer_architecture(args)

    arch.__name__ = f"transformer_{name}"
    arch.__doc__ = f"efficient_transformer: {name} self attention, {cross} cross attention (fairseq's base sizes)."
    return arch


def preset_attentions(name: str) -> Dict[str, str]:
    """The roles of the ``transformer_<name>`` preset (see the module docstring)."""
    caps = available_attentions()[name].capabilities
    cross = name if caps.supports(Pattern.NONCAUSAL_CROSS) else "vanilla"
    return {"encoder": name, "decoder": name, "cross": cross}


def _register(model: str, arch_name: str, fn) -> bool:
    if arch_name in ARCH_MODEL_REGISTRY:
        logger.warning("arch %s already exists in fairseq; preset for %s not registered", arch_name, model)
        return False
    register_model_architecture(model, arch_name)(fn)
    return True


def register_presets() -> Dict[str, str]:
    """Register the arch presets of every registered mechanism not registered yet; returns {arch: mechanism}."""
    added = {}
    for name, info in available_attentions().items():
        caps = info.capabilities
        lm_arch = f"transformer_lm_{name}"
        if caps.supports(Pattern.CAUSAL_SELF) and lm_arch not in _PRESETS:
            if _register("efficient_transformer_lm", lm_arch, _lm_preset(name)):
                added[lm_arch] = name
            _PRESETS.add(lm_arch)
        mt_arch = f"transformer_{name}"
        if caps.supports(Pattern.CAUSAL_SELF) and caps.supports(Pattern.NONCAUSAL_SELF) and mt_arch not in _PRESETS:
            if _register("efficient_transformer", mt_arch, _mt_preset(name, preset_attentions(name)["cross"])):
                added[mt_arch] = name
            _PRESETS.add(mt_arch)
    return added


_PRESETS: set = set()
register_presets()
