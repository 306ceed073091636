"""``python -m efficient_fairseq [lm|translation]``: the plugin's model flags with their help.

fairseq's ``--help`` exits before model-specific flags are added (it parses
``--arch`` first), so it never lists them; this prints the attention flags and
every mechanism option of a model, with help texts and per-mechanism defaults.
"""

import argparse
import sys

from . import EfficientTransformerLanguageModel, EfficientTransformerModel
from .models import LM_OPTION_PREFIXES, MT_OPTION_PREFIXES
from .options import add_attention_args


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m efficient_fairseq", description=__doc__)
    p.add_argument("model", nargs="?", choices=("lm", "translation"), default="lm")
    which = p.parse_args(argv).model
    if which == "lm":
        parser = argparse.ArgumentParser(prog="fairseq-train ... --arch efficient_transformer_lm", add_help=False)
        add_attention_args(parser, ("decoder",), LM_OPTION_PREFIXES)
        archs = "transformer_lm_<name>"
    else:
        parser = argparse.ArgumentParser(prog="fairseq-train ... --arch efficient_transformer", add_help=False)
        add_attention_args(parser, ("encoder", "decoder", "cross"), MT_OPTION_PREFIXES)
        archs = "transformer_<name>"
    from fairseq.models import ARCH_MODEL_REGISTRY

    model = EfficientTransformerLanguageModel if which == "lm" else EfficientTransformerModel
    presets = sorted(a for a, m in ARCH_MODEL_REGISTRY.items() if m is model)
    sys.stdout.write(parser.format_help())
    print(f"\narch presets ({archs}): {', '.join(presets)}")


if __name__ == "__main__":
    main()
