"""Loading fairseq checkpoints under torch's safe (``weights_only``) loading.

torch >= 2.6 loads with ``weights_only=True`` by default and fairseq 0.12
calls ``torch.load`` without that argument, so its checkpoints only load if
every non-tensor object they pickle is allow-listed.  Instead of disabling
safe loading (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``), the plugin allow-lists,
when imported, exactly the globals fairseq checkpoints of our models pickle
(found by saving and loading real checkpoints; see tests/test_fairseq_plugin.py):

* ``argparse.Namespace``: the only one.  ``efficient_transformer`` is, like
  fairseq's ``transformer``, an argparse ("legacy") model, so its checkpoint's
  ``cfg["model"]`` is the parsed ``Namespace``.  ``efficient_transformer_lm``
  checkpoints (a dataclass model) need nothing beyond torch's defaults.

Everything else in a fairseq checkpoint (``cfg`` as plain containers, model and
optimizer state, ``extra_state``) is tensors, builtins and ``OrderedDict``,
which torch allows already.  ``tests/test_fairseq_plugin.py`` checks that a
translation checkpoint fails to load without this list and that both models'
checkpoints load with it.
"""

from __future__ import annotations

import argparse

import torch

__all__ = ["SAFE_GLOBALS", "allow_fairseq_checkpoints"]

SAFE_GLOBALS = (argparse.Namespace,)


def allow_fairseq_checkpoints() -> None:
    """Add :data:`SAFE_GLOBALS` to torch's weights-only unpickler allow-list (idempotent)."""
    torch.serialization.add_safe_globals(list(SAFE_GLOBALS))
