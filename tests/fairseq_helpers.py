"""Running fairseq's command-line programs for the plugin tests.

``run_cli`` runs the real console script in a subprocess (with ``PYTHONPATH``
set to the repo root and ``plugins/``); ``train`` / ``eval_lm`` /
``generate`` run the same programs in this process, exactly as their
``cli_main`` does (parse the same argv, convert to the config, call
``main``), which saves fairseq's import time per call.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugins" / "efficient_fairseq"
BIN = Path(sys.executable).parent

if os.environ.get("EA_REQUIRE_FAIRSEQ") == "1":
    import fairseq  # noqa: F401  (must import in CI)
else:
    pytest.importorskip("fairseq")


def env() -> Dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "plugins")])
    e.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    e.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
    e["OMP_NUM_THREADS"] = "1"
    return e


def run_cli(
    program: str, args: Sequence[str], cwd=None, stdin: str = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run a fairseq console script (``fairseq-train`` ...) in a subprocess."""
    exe = BIN / program
    cmd = (
        [str(exe)]
        if exe.exists()
        else [sys.executable, "-m", "fairseq_cli." + program.split("-", 1)[1].replace("-", "_")]
    )
    proc = subprocess.run(
        cmd + [str(a) for a in args], cwd=cwd, env=env(), input=stdin, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{program} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _user_dir() -> List[str]:
    return ["--user-dir", str(PLUGIN)]


def train(args: Sequence[str]) -> None:
    """``fairseq-train`` in this process."""
    from fairseq import distributed_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train as train_cli

    parser = options.get_training_parser()
    parsed = options.parse_args_and_arch(parser, input_args=_user_dir() + [str(a) for a in args])
    distributed_utils.call_main(convert_namespace_to_omegaconf(parsed), train_cli.main)


def eval_lm(args: Sequence[str]) -> Dict:
    """``fairseq-eval-lm`` in this process; returns its results (loss, perplexity)."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import eval_lm as eval_cli

    parser = options.get_eval_lm_parser()
    parsed = options.parse_args_and_arch(parser, input_args=_user_dir() + [str(a) for a in args])
    return eval_cli.main(convert_namespace_to_omegaconf(parsed))


def generate(args: Sequence[str], results: Path) -> List[str]:
    """``fairseq-generate`` in this process; returns the ``H-`` lines it wrote."""
    from fairseq import options
    from fairseq_cli import generate as gen_cli

    parser = options.get_generation_parser()
    parsed = options.parse_args_and_arch(
        parser, input_args=_user_dir() + [str(a) for a in args] + ["--results-path", str(results)]
    )
    gen_cli.main(parsed)
    lines = []
    for f in Path(results).glob("generate-*.txt"):
        lines += [ln for ln in f.read_text().splitlines() if ln.startswith("H-")]
    return lines


def option_flags(options: Dict, prefix: str = "--attn-") -> List[str]:
    """Command-line flags for mechanism options (the test references' small settings)."""
    out = []
    for name, value in options.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (tuple, list)):
            text = ",".join(map(str, value))
        else:
            text = str(value)
        out += [prefix + name.replace("_", "-"), text]
    return out
