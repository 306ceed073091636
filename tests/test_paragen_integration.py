"""``paragen-run --lib efficient_transformers`` end to end (needs ParaGen; skipped without it).

Each test writes a small synthetic corpus with ``examples/paragen/make_data.py``
into a temporary directory outside the repository, trains a few steps from the
example configs and evaluates the saved checkpoint there.  Mechanisms are
chosen from the registry by capability (a non-vanilla one where registered),
and one test registers its own mechanisms through a second ``--lib`` module,
as a user would.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from references import REFERENCES

from efficient_attention import Pattern, available_attentions

if importlib.util.find_spec("paragen") is None:
    pytest.skip(
        "ParaGen is not installed: install it from https://github.com/bytedance/ParaGen as described in "
        "examples/paragen/README.md to run the paragen-run integration tests",
        allow_module_level=True,
    )

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "paragen"
SMALL_MODEL = ["--task.model.d_model", "32"] + [
    arg
    for side in ("encoder", "decoder")
    for arg in (
        f"--task.model.{side}.num_layers",
        "1",
        f"--task.model.{side}.d_model",
        "32",
        f"--task.model.{side}.dim_feedforward",
        "64",
    )
]
FEW_STEPS = [
    "--task.trainer.max_steps",
    "4",
    "--task.trainer.validate_interval_step",
    "4",
    "--task.trainer.log_interval",
    "2",
]


def _paragen_run() -> str:
    exe = Path(sys.executable).parent / "paragen-run"
    found = str(exe) if exe.exists() else shutil.which("paragen-run")
    if found is None:
        pytest.fail("ParaGen is importable but its paragen-run command is not installed")
    return found


def _pick(pattern: Pattern, incremental: bool = False):
    """A non-vanilla mechanism with ``pattern`` if one is registered (else vanilla), with its test options."""
    names = [
        n
        for n, info in available_attentions().items()
        if info.capabilities.supports(pattern) and (info.capabilities.incremental or not incremental)
    ]
    name = next((n for n in names if n != "vanilla"), "vanilla")
    return name, dict(REFERENCES[name].options) if name in REFERENCES else {}


def _attention_args(key: str, name: str, options: dict):
    args = [f"--{key}.name", name]
    for opt, val in options.items():
        args += [f"--{key}.{opt}", repr(val) if not isinstance(val, str) else val]
    return args


def run(workdir: Path, config: str, *args: str, lib: str = "efficient_transformers", check: bool = True):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "plugins"), str(workdir)]))
    cmd = [_paragen_run(), "--config", str(EXAMPLES / config), "--lib", lib, *args]
    proc = subprocess.run(cmd, cwd=str(workdir), env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture
def workdir(tmp_path):
    assert ROOT not in tmp_path.parents
    subprocess.run(
        [sys.executable, str(EXAMPLES / "make_data.py"), str(tmp_path / "data"), "--scale", "0.05"],
        check=True,
        capture_output=True,
    )
    return tmp_path


def _train_and_evaluate(workdir: Path, attention_args):
    run(workdir, "translation.yaml", *SMALL_MODEL, *FEW_STEPS, *attention_args)
    checkpoint = workdir / "checkpoints" / "last.pt"
    assert checkpoint.exists()
    proc = run(
        workdir,
        "translation.yaml",
        *SMALL_MODEL,
        *attention_args,
        "--task.mode",
        "evaluate",
        "--task.model.path",
        str(checkpoint),
    )
    log = proc.stdout + proc.stderr
    assert "test.bleu" in log, log[-3000:]
    hypos = list((workdir / "hypos").glob("*"))
    assert hypos, "evaluation wrote no hypotheses"
    return log


def test_translation_trains_then_evaluates_from_checkpoint(workdir):
    enc = _pick(Pattern.NONCAUSAL_SELF)
    dec = _pick(Pattern.CAUSAL_SELF, incremental=True)
    cross = _pick(Pattern.NONCAUSAL_CROSS)
    args = (
        _attention_args("task.model.encoder.attention", *enc)
        + _attention_args("task.model.decoder.self_attention", *dec)
        + _attention_args("task.model.decoder.cross_attention", *cross)
    )
    log = _train_and_evaluate(workdir, args)
    assert f"'name': '{enc[0]}'" in log or f'"name": "{enc[0]}"' in log


USER_MECHANISMS = """
from efficient_attention import Capabilities, MultiheadAttention, Pattern, register_attention

@register_attention("user_noncausal")
class UserNoncausal(MultiheadAttention):
    capabilities = Capabilities(patterns=frozenset({Pattern.NONCAUSAL_SELF, Pattern.NONCAUSAL_CROSS}))

@register_attention("user_no_incremental")
class UserNoIncremental(MultiheadAttention):
    capabilities = Capabilities(patterns=frozenset({Pattern.CAUSAL_SELF}), incremental=False)
"""


def test_user_mechanisms_registered_through_a_second_lib(workdir):
    """Mechanisms from the user's own module; the decoder's has no incremental decoding (recomputed prefix)."""
    (workdir / "user_mechs.py").write_text(textwrap.dedent(USER_MECHANISMS))
    lib = "efficient_transformers,user_mechs"
    args = [
        "--task.model.encoder.attention.name",
        "user_noncausal",
        "--task.model.decoder.self_attention.name",
        "user_no_incremental",
        "--task.model.decoder.cross_attention.name",
        "user_noncausal",
    ]
    run(workdir, "translation.yaml", *SMALL_MODEL, *FEW_STEPS, *args, lib=lib)
    proc = run(
        workdir,
        "translation.yaml",
        *SMALL_MODEL,
        *args,
        "--task.mode",
        "evaluate",
        "--task.model.path",
        str(workdir / "checkpoints" / "last.pt"),
        lib=lib,
    )
    log = proc.stdout + proc.stderr
    assert "test.bleu" in log and "has no incremental decoding" in log


def test_unsupported_pattern_fails_at_build_naming_layer(workdir):
    (workdir / "user_mechs.py").write_text(textwrap.dedent(USER_MECHANISMS))
    proc = run(
        workdir,
        "translation.yaml",
        *SMALL_MODEL,
        *FEW_STEPS,
        "--task.model.decoder.self_attention.name",
        "user_noncausal",
        lib="efficient_transformers,user_mechs",
        check=False,
    )
    assert proc.returncode != 0
    assert (
        "decoder layer 0 self_attention: attention 'user_noncausal' does not support causal self attention"
        in proc.stdout + proc.stderr
    )


def test_unknown_mechanism_lists_registered(workdir):
    proc = run(workdir, "translation.yaml", "--task.model.encoder.attention.name", "no_such_attention", check=False)
    assert proc.returncode != 0
    assert "unknown attention 'no_such_attention'; registered: " in proc.stdout + proc.stderr


def test_masked_lm_trains_and_validates(workdir):
    name, options = _pick(Pattern.NONCAUSAL_SELF)
    proc = run(
        workdir,
        "masked_lm.yaml",
        "--task.model.encoder.num_layers",
        "1",
        *_attention_args("task.model.encoder.attention", name, options),
        *FEW_STEPS,
    )
    assert "best.valid.criterion" in proc.stdout + proc.stderr
    assert (workdir / "checkpoints-mlm" / "last.pt").exists()


# ------------------------------------------- ParaGen's searches on our decoder
def _paragen_decoder(self_attention):
    import torch
    from paragen.modules.decoders import create_decoder

    import efficient_transformers  # noqa: F401  (registers with ParaGen)

    torch.manual_seed(0)
    dec = create_decoder(
        {
            "class": "EfficientTransformerDecoder",
            "num_layers": 2,
            "d_model": 16,
            "n_head": 4,
            "dim_feedforward": 32,
            "self_attention": self_attention,
        }
    )
    embed = torch.nn.Embedding(30, 16, padding_idx=1)
    dec.build(embed=embed, special_tokens={"pad": 1, "bos": 2, "eos": 3, "unk": 0}, out_proj=None)
    return dec.eval()


@pytest.mark.parametrize("search", ["GreedySearch", "BeamSearch", "BeamSearchV3"])
def test_paragen_search_with_incremental_decoding_equals_full_recompute(search):
    """ParaGen's searches give the same result whether our decoder decodes incrementally ('infer')
    or rescores the whole prefix every step ('valid'), beam reordering through get_cache/set_cache.

    Not BeamSearchV2: its cache update (``non_finished_index // (beam * 2)``, always 0) picks the
    wrong rows for any cached decoder, ParaGen's own TransformerDecoder included.
    """
    import torch
    from paragen.modules.search import create_search

    name, options = _pick(Pattern.CAUSAL_SELF, incremental=True)
    dec = _paragen_decoder({"name": name, **options})
    cfg = {"class": search, "maxlen_coef": (1.0, 4)}
    if search != "GreedySearch":
        cfg.update(beam=3, **({"minlen": 0} if search == "BeamSearch" else {}))
    g = torch.Generator().manual_seed(1)
    memory = torch.randn(7, 2, 16, generator=g)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    prefix = torch.full((2, 1), 2)
    results = {}
    for mode in ("valid", "infer"):
        s = create_search(dict(cfg))
        s.build(decoder=dec, bos=2, eos=3, pad=1)
        s.reset(mode)
        with torch.no_grad():
            results[mode] = s(prefix, memory, padding)
    torch.testing.assert_close(results["infer"][0], results["valid"][0])
    assert torch.equal(results["infer"][1], results["valid"][1])
