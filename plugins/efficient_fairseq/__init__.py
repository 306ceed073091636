"""fairseq plugin of efficient-attention: ``fairseq-train --user-dir plugins/efficient_fairseq``.

Importing it (through ``--user-dir`` or as the installed package
``efficient_fairseq``) registers with fairseq:

* the language model ``efficient_transformer_lm`` (``--decoder-attention NAME``)
  and an arch ``transformer_lm_<name>`` per causal-capable mechanism;
* the translation model ``efficient_transformer`` (``--encoder-attention``,
  ``--decoder-attention``, ``--cross-attention``) and an arch
  ``transformer_<name>`` per mechanism with both self patterns;
* every mechanism option as ``--attn-<option>`` (and per-role overrides for
  translation), derived from the registry;

and allow-lists what fairseq checkpoints need for torch's safe loading.  Configuration mistakes
(unknown mechanism, an option the mechanism does not have, a bad value) end fairseq's programs
with one line ``<program>: error: <message>``; ``EA_TRACEBACK=1`` shows the traceback.  See
``docs/fairseq.md``.
"""

from .checkpoints import allow_fairseq_checkpoints
from .options import install_user_error_hook

allow_fairseq_checkpoints()
install_user_error_hook()  # configuration mistakes print as one line, not a traceback

from .models import (  # noqa: E402  (after the allow-list: loading may follow the import)
    EfficientTransformerLanguageModel,
    EfficientTransformerLanguageModelConfig,
    EfficientTransformerModel,
    register_presets,
)

__all__ = [
    "EfficientTransformerLanguageModel",
    "EfficientTransformerLanguageModelConfig",
    "EfficientTransformerModel",
    "allow_fairseq_checkpoints",
    "register_presets",
]
