"""The fairseq plugin: models, options from the registry, generation, checkpoints, bad input.

End-to-end tests share one preprocessed LM corpus and one translation corpus
per session; per mechanism they train a tiny model for a few updates, then
evaluate and generate from it.  fairseq's programs run in this process where
that is what their ``cli_main`` does anyway (see ``fairseq_helpers``); the
console scripts themselves run in subprocesses in the ``*_cli`` tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing
from pathlib import Path

import fairseq_helpers as fh
import pytest
import torch
from fairseq_helpers import ROOT, eval_lm, generate, option_flags, run_cli, train
from helpers import EMBED_DIM, NUM_HEADS
from references import REFERENCES

from efficient_attention import (
    EfficientAttention,
    MultiheadAttention,
    Pattern,
    UnsupportedPatternError,
    available_attentions,
    registry,
)
from efficient_attention.capabilities import Capabilities

sys.path.insert(0, str(ROOT / "plugins"))
import efficient_fairseq  # noqa: E402
from efficient_fairseq import options as plugin_options  # noqa: E402
from efficient_fairseq.models import lm_attention_choices, mt_attention_choices, preset_attentions  # noqa: E402

INFOS = available_attentions()
CAUSAL = [n for n, i in INFOS.items() if i.capabilities.supports(Pattern.CAUSAL_SELF)]
DECODABLE = [n for n in CAUSAL if INFOS[n].capabilities.incremental]
NOT_CAUSAL = [n for n in INFOS if n not in CAUSAL]
TOKENS_PER_SAMPLE = 64
N_VALID = 6
# fairseq's batch_by_size drops the last partial batch when --batch-size is below
# --required-batch-size-multiple (default 8): tiny runs must set it to 1
NO_DROP = ["--required-batch-size-multiple", "1"]

TINY_LM = [
    "--task",
    "language_modeling",
    "--decoder-layers",
    "1",
    "--decoder-embed-dim",
    str(EMBED_DIM),
    "--decoder-ffn-embed-dim",
    "32",
    "--decoder-attention-heads",
    str(NUM_HEADS),
    "--tokens-per-sample",
    str(TOKENS_PER_SAMPLE),
    "--batch-size",
    "4",
    "--required-batch-size-multiple",
    "1",
    "--optimizer",
    "adam",
    "--lr",
    "0.003",
    "--cpu",
    "--no-epoch-checkpoints",
    "--no-progress-bar",
    "--num-workers",
    "0",
    "--seed",
    "1",
]
TINY_MT = [
    "--task",
    "translation",
    "--encoder-layers",
    "1",
    "--decoder-layers",
    "1",
    "--encoder-embed-dim",
    str(EMBED_DIM),
    "--decoder-embed-dim",
    str(EMBED_DIM),
    "--encoder-ffn-embed-dim",
    "32",
    "--decoder-ffn-embed-dim",
    "32",
    "--encoder-attention-heads",
    str(NUM_HEADS),
    "--decoder-attention-heads",
    str(NUM_HEADS),
    "--batch-size",
    "4",
    "--required-batch-size-multiple",
    "1",
    "--optimizer",
    "adam",
    "--lr",
    "0.003",
    "--cpu",
    "--no-epoch-checkpoints",
    "--no-progress-bar",
    "--num-workers",
    "0",
    "--seed",
    "1",
    "--share-all-embeddings",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one torch thread is faster, and avoids OpenMP spin-waits on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def reference_options(name: str):
    """The small option settings the generic tests use for ``name`` (only real options)."""
    ref = REFERENCES.get(name)
    opts = INFOS[name].options
    return {k: v for k, v in (ref.options.items() if ref else ()) if k in opts}


# ----------------------------------------------------------------- corpora
@pytest.fixture(scope="session")
def lm_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fairseq_lm")
    import subprocess

    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples/fairseq/make_corpus.py"),
            "--out",
            str(root / "raw"),
            "--min-len",
            "12",
            "--max-len",
            "40",
            "--train",
            "40",
            "--valid",
            "16",
            "--test",
            str(N_VALID),
            "--seed",
            "3",
        ],
        check=True,
        env=fh.env(),
    )
    run_cli(
        "fairseq-preprocess",
        [
            "--only-source",
            "--trainpref",
            root / "raw/train.txt",
            "--validpref",
            root / "raw/valid.txt",
            "--testpref",
            root / "raw/test.txt",
            "--destdir",
            root / "bin",
            "--workers",
            "1",
        ],
    )
    return root / "bin"


@pytest.fixture(scope="session")
def mt_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fairseq_mt")
    import subprocess

    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples/fairseq/make_corpus.py"),
            "--out",
            str(root / "raw"),
            "--format",
            "translation",
            "--task",
            "copy",
            "--min-len",
            "8",
            "--max-len",
            "24",
            "--train",
            "40",
            "--valid",
            str(N_VALID),
            "--test",
            str(N_VALID),
            "--seed",
            "3",
        ],
        check=True,
        env=fh.env(),
    )
    run_cli(
        "fairseq-preprocess",
        [
            "--source-lang",
            "src",
            "--target-lang",
            "tgt",
            "--trainpref",
            root / "raw/train",
            "--validpref",
            root / "raw/valid",
            "--testpref",
            root / "raw/test",
            "--destdir",
            root / "bin",
            "--joined-dictionary",
            "--workers",
            "1",
        ],
    )
    return root / "bin"


@pytest.fixture(scope="session")
def lm_checkpoint(lm_data, tmp_path_factory):
    """Train (once per session and mechanism) a tiny LM; returns checkpoint_last.pt."""
    done = {}

    def get(name: str) -> Path:
        if name not in done:
            save = tmp_path_factory.mktemp(f"lm_{name}")
            train(
                [
                    lm_data,
                    "--arch",
                    f"transformer_lm_{name}",
                    *TINY_LM,
                    "--max-update",
                    "3",
                    "--save-dir",
                    save,
                    *option_flags(reference_options(name)),
                ]
            )
            done[name] = save / "checkpoint_last.pt"
        return done[name]

    return get


def load_lm(ckpt: Path, data: Path):
    from fairseq import checkpoint_utils

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(ckpt)], arg_overrides={"data": str(data)})
    for m in models:
        m.eval()
    return models, cfg, task


def first_batch(task, split: str, bsz: int = 3):
    task.load_dataset(split)
    itr = task.get_batch_iterator(
        dataset=task.dataset(split), max_sentences=bsz, max_positions=(1024, 1024), ignore_invalid_inputs=True
    )
    return next(iter(itr.next_epoch_itr(shuffle=False)))


def assert_cache_equals_full_recompute(models, task, sample, prefix_tokens=None, max_len_b=10):
    """SequenceGenerator (beam 2) with the incremental cache == the same search recomputing every step."""
    from fairseq.sequence_generator import SequenceGenerator

    def run(cached: bool):
        gen = SequenceGenerator(models, task.target_dictionary, beam_size=2, max_len_b=max_len_b)
        assert gen.model.has_incremental_states(), "the decoder must be a FairseqIncrementalDecoder"
        gen.model.has_incremental = cached
        with torch.no_grad():
            return gen.generate(models, sample, prefix_tokens=prefix_tokens)

    cached, full = run(True), run(False)
    assert len(cached) == len(full) > 0
    for hc, hf in zip(cached, full):
        assert [h["tokens"].tolist() for h in hc] == [h["tokens"].tolist() for h in hf]
        for a, b in zip(hc, hf):
            torch.testing.assert_close(a["positional_scores"], b["positional_scores"], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------- registry-derived
def test_presets_cover_every_mechanism():
    from fairseq.models import ARCH_MODEL_REGISTRY

    for name, info in INFOS.items():
        caps = info.capabilities
        assert (f"transformer_lm_{name}" in ARCH_MODEL_REGISTRY) == caps.supports(Pattern.CAUSAL_SELF)
        both = caps.supports(Pattern.CAUSAL_SELF) and caps.supports(Pattern.NONCAUSAL_SELF)
        assert (f"transformer_{name}" in ARCH_MODEL_REGISTRY) == both
        if both:
            expected = name if caps.supports(Pattern.NONCAUSAL_CROSS) else "vanilla"
            assert preset_attentions(name)["cross"] == expected


def test_every_option_is_a_flag_and_a_config_field():
    fields = efficient_fairseq.EfficientTransformerLanguageModelConfig.__dataclass_fields__
    for info in INFOS.values():
        for opt, spec in info.options.items():
            assert f"attn_{opt}" in fields and fields[f"attn_{opt}"].default is None
            assert spec.help in fields[f"attn_{opt}"].metadata["help"]
    group = argparse.ArgumentParser()
    efficient_fairseq.EfficientTransformerModel.add_args(group)
    dests = {a.dest for a in group._actions}
    for info in INFOS.values():
        for opt in info.options:
            for prefix in ("attn", "encoder_attn", "decoder_attn", "cross_attn"):
                assert f"{prefix}_{opt}" in dests
    assert {"encoder_attention", "decoder_attention", "cross_attention"} <= dests


def test_help_lists_options_with_mechanism_defaults(capsys):
    from efficient_fairseq.__main__ import main as plugin_help

    plugin_help(["lm"])
    text = capsys.readouterr().out
    assert all(f"transformer_lm_{n}" in text for n in CAUSAL)
    for name, info in INFOS.items():
        for opt, spec in info.options.items():
            assert "--attn-" + opt.replace("_", "-") in text
            assert f"{name}={spec.default!r}" in " ".join(text.split())


# --------------------------------------------------------- option parsing
class _Toy(EfficientAttention):
    """Test-only mechanism: noncausal self attention only, with typed options (never registered globally)."""

    capabilities = Capabilities(patterns=frozenset({Pattern.NONCAUSAL_SELF}))
    option_help = {"wsize": "window", "mode": "a choice", "sizes": "a list", "flag": "a switch"}

    def __init__(
        self,
        *args,
        wsize: int = 4,
        mode: typing.Literal["a", "b"] = "a",
        sizes: typing.Tuple[int, ...] = (1,),
        flag: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.wsize, self.mode, self.sizes, self.flag = wsize, mode, sizes, flag


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "toy_noncausal", _Toy)
    monkeypatch.setattr(_Toy, "attention_name", "toy_noncausal", raising=False)
    return "toy_noncausal"


def test_option_values_are_parsed_with_their_annotated_types():
    conv = plugin_options.convert_value
    assert conv(int, "7", "--attn-x", "m") == 7
    assert conv(typing.Optional[int], "none", "--attn-x", "m") is None
    assert conv(bool, "false", "--attn-x", "m") is False and conv(bool, True, "--attn-x", "m") is True
    assert conv(float, "0.5", "--attn-x", "m") == 0.5
    assert conv(typing.Literal["a", "b"], "b", "--attn-x", "m") == "b"
    assert conv(typing.Tuple[int, ...], "1,2,3", "--attn-x", "m") == (1, 2, 3)
    for tp, bad in ((int, "seven"), (int, True), (bool, "maybe"), (typing.Literal["a", "b"], "c")):
        with pytest.raises(ValueError, match="--attn-x"):
            conv(tp, bad, "--attn-x", "m")


def test_options_shared_by_mechanisms_with_different_types_become_strings(toy_registered):
    class Other(_Toy):
        option_help = {**_Toy.option_help, "wsize": "window as a fraction"}

        def __init__(self, *args, wsize: float = 0.5, **kwargs):
            super().__init__(*args, **kwargs)

    infos = dict(available_attentions())
    infos["other"] = registry.AttentionInfo("other", Other, Other.capabilities, Other.options(), ())
    fields = {f.option: f for f in plugin_options.option_fields("attn", infos)}
    assert fields["wsize"].field_type == typing.Optional[str]
    assert "toy_noncausal=4" in fields["wsize"].help and "other=0.5" in fields["wsize"].help
    assert fields["flag"].field_type == typing.Optional[bool]
    assert fields["mode"].choices == ("a", "b")


def test_names_with_different_meanings_get_per_mechanism_flags():
    ambiguous = plugin_options.ambiguous_options()
    assert {"num_landmarks", "window_size", "block_size", "autopad"} <= set(ambiguous)
    assert "num_kv_heads" not in ambiguous and "layout" not in ambiguous  # same declaration everywhere
    fields = efficient_fairseq.EfficientTransformerLanguageModelConfig.__dataclass_fields__
    group = argparse.ArgumentParser()
    efficient_fairseq.EfficientTransformerModel.add_args(group)
    dests = {a.dest for a in group._actions}
    for opt, owners in ambiguous.items():
        for name, spec in owners:
            assert f"attn_{name}_{opt}" in fields and f"attn_{name}_{opt}" in dests
            assert spec.help in fields[f"attn_{name}_{opt}"].metadata["help"]
            assert f"encoder_attn_{name}_{opt}" not in dests  # the role flags already name one mechanism


def test_shared_flag_works_while_unambiguous_and_per_mechanism_flags_override_it():
    lm = lm_attention_choices(argparse.Namespace(decoder_attention="causal_ls", attn_num_landmarks="4"))
    assert lm["decoder"].options == {"num_landmarks": 4}
    lm = lm_attention_choices(
        argparse.Namespace(decoder_attention="causal_ls", attn_num_landmarks="4", attn_causal_ls_num_landmarks="8")
    )
    assert lm["decoder"].options == {"num_landmarks": 8}
    mt = mt_attention_choices(
        argparse.Namespace(
            encoder_attention="nystrom",
            decoder_attention="causal_ls",
            attn_nystrom_num_landmarks="8",
            attn_causal_ls_num_landmarks="2",
        )
    )
    assert mt["encoder"].options == {"num_landmarks": 8} and mt["decoder"].options == {"num_landmarks": 2}
    with pytest.raises(
        ValueError,
        match=r"--attn-num-landmarks is ambiguous in this model.*"
        r"--attn-nystrom-num-landmarks, --attn-causal-ls-num-landmarks",
    ):
        mt_attention_choices(
            argparse.Namespace(encoder_attention="nystrom", decoder_attention="causal_ls", attn_num_landmarks="8")
        )
    with pytest.raises(ValueError, match=r"--attn-lara-num-landmarks is set but no attention of this model is lara"):
        lm_attention_choices(argparse.Namespace(decoder_attention="causal_ls", attn_lara_num_landmarks="8"))


def test_pattern_error_names_the_flag_and_the_alternatives(toy_registered):
    with pytest.raises(UnsupportedPatternError, match=r"--decoder-attention toy_noncausal.*causal self"):
        lm_attention_choices(argparse.Namespace(decoder_attention="toy_noncausal"))
    with pytest.raises(UnsupportedPatternError, match="--cross-attention"):
        mt_attention_choices(argparse.Namespace(cross_attention="toy_noncausal"))
    ok = mt_attention_choices(argparse.Namespace(encoder_attention="toy_noncausal", encoder_attn_wsize="9"))
    assert ok["encoder"].options == {"wsize": 9} and ok["decoder"].options == {}


def test_an_option_no_chosen_mechanism_has_is_an_error(toy_registered):
    with pytest.raises(ValueError, match=r"--attn-wsize is set but no attention"):
        lm_attention_choices(argparse.Namespace(decoder_attention="vanilla", attn_wsize=3))
    with pytest.raises(ValueError, match=r"--decoder-attn-wsize is set but vanilla"):
        mt_attention_choices(argparse.Namespace(encoder_attention="toy_noncausal", decoder_attn_wsize=3))


def test_unknown_name_lists_the_registered_ones(capsys):
    from fairseq import options

    with pytest.raises(ValueError, match="unknown attention 'nosuch'; registered: .*vanilla"):
        lm_attention_choices(argparse.Namespace(decoder_attention="nosuch"))
    parser = options.get_training_parser()
    with pytest.raises(SystemExit):
        options.parse_args_and_arch(
            parser,
            input_args=[
                "data",
                "--user-dir",
                str(fh.PLUGIN),
                "--arch",
                "efficient_transformer_lm",
                "--decoder-attention",
                "nosuch",
            ],
        )
    err = capsys.readouterr().err
    assert "--decoder-attention" in err and "unknown attention 'nosuch'" in err
    assert all(name in err for name in INFOS)


def test_unparsable_option_value_names_the_flag(capsys):
    from fairseq import options

    parser = options.get_training_parser()
    with pytest.raises(SystemExit):
        options.parse_args_and_arch(
            parser,
            input_args=[
                "data",
                "--user-dir",
                str(fh.PLUGIN),
                "--arch",
                "transformer_lm_vanilla",
                "--attn-num-kv-heads",
                "two",
            ],
        )
    assert "--attn-num-kv-heads" in capsys.readouterr().err


# ------------------------------------------------------------ end to end
@pytest.mark.slow
def test_invalid_option_value_fails_before_training(lm_data, tmp_path):
    with pytest.raises(ValueError, match=r"--decoder-attention vanilla.*num_kv_heads"):
        train(
            [
                lm_data,
                "--arch",
                "transformer_lm_vanilla",
                *TINY_LM,
                "--max-update",
                "1",
                "--save-dir",
                tmp_path,
                "--attn-num-kv-heads",
                "3",
            ]
        )
    assert not list(tmp_path.glob("*.pt"))


@pytest.mark.slow
def test_cosformer_max_len_below_the_positions_fails_before_training(lm_data, tmp_path):
    """Issue 15 item 9: ``--attn-max-len 16`` with 64 tokens per sample is refused when the model is built."""
    with pytest.raises(ValueError, match=r"--decoder-attention cosformer: max_len=16 is shorter"):
        train(
            [
                lm_data,
                "--arch",
                "transformer_lm_cosformer",
                *TINY_LM,
                "--max-update",
                "1",
                "--save-dir",
                tmp_path,
                "--attn-max-len",
                "16",
            ]
        )
    assert not list(tmp_path.glob("*.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("name", NOT_CAUSAL + ["toy_noncausal"])
def test_mechanism_without_causal_self_fails_before_training(name, lm_data, tmp_path, request):
    if name == "toy_noncausal":
        request.getfixturevalue("toy_registered")
    with pytest.raises(UnsupportedPatternError, match=f"--decoder-attention {name}"):
        train(
            [
                lm_data,
                "--arch",
                "efficient_transformer_lm",
                *TINY_LM,
                "--decoder-attention",
                name,
                "--max-update",
                "1",
                "--save-dir",
                tmp_path,
            ]
        )
    assert not list(tmp_path.glob("*.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("name", CAUSAL)
def test_lm_train_eval_generate(name, lm_data, lm_checkpoint, tmp_path):
    ckpt = lm_checkpoint(name)
    state = torch.load(ckpt, map_location="cpu")  # safe loading (weights_only default), plugin allow-list
    assert state["cfg"]["model"]["decoder_attention"] == name
    results = eval_lm(
        [
            lm_data,
            "--path",
            ckpt,
            "--tokens-per-sample",
            TOKENS_PER_SAMPLE,
            "--batch-size",
            "4",
            "--cpu",
            "--num-workers",
            "0",
            *NO_DROP,
        ]
    )
    assert math.isfinite(results["perplexity"]) and results["perplexity"] > 1.0
    hyps = generate(
        [
            lm_data,
            "--task",
            "language_modeling",
            "--path",
            ckpt,
            "--beam",
            "2",
            "--max-len-b",
            "6",
            "--batch-size",
            "2",
            "--cpu",
            "--sample-break-mode",
            "eos",
            "--prefix-size",
            "3",
            "--tokens-per-sample",
            TOKENS_PER_SAMPLE,
            "--gen-subset",
            "test",
            "--num-workers",
            "0",
            *NO_DROP,
        ],
        tmp_path / "gen",
    )
    assert len(hyps) == N_VALID
    assert all(len(h.split("\t")[2].split()) >= 3 for h in hyps)


@pytest.mark.slow
@pytest.mark.parametrize("name", DECODABLE)
def test_lm_beam_search_cache_equals_recompute(name, lm_data, lm_checkpoint):
    models, cfg, task = load_lm(lm_checkpoint(name), lm_data)
    cls = INFOS[name].cls
    assert all(isinstance(layer.self_attn, cls) for layer in models[0].decoder.layers)
    sample = first_batch(task, "valid")
    assert_cache_equals_full_recompute(models, task, sample, prefix_tokens=sample["target"][:, :3])


def _mt_combinations():
    """vanilla everywhere, plus per role the first non-vanilla mechanism able to fill it (from the registry)."""
    combos = [("vanilla", "vanilla", "vanilla", {"--cross-attn-num-kv-heads": "1"})]

    def first(pattern):
        return next((n for n in sorted(INFOS) if n != "vanilla" and INFOS[n].capabilities.supports(pattern)), "vanilla")

    mixed = (first(Pattern.NONCAUSAL_SELF), first(Pattern.CAUSAL_SELF), first(Pattern.NONCAUSAL_CROSS))
    if mixed != ("vanilla",) * 3:
        combos.append((*mixed, {}))
    return combos


def _train_mt(data, save, enc, dec, cross, extra, max_update=3):
    flags = []
    for role, name in (("encoder", enc), ("decoder", dec), ("cross", cross)):
        flags += [f"--{role}-attention", name, *option_flags(reference_options(name), f"--{role}-attn-")]
    for k, v in extra.items():
        flags += [k, v]
    train(
        [data, "--arch", "efficient_transformer", *TINY_MT, "--max-update", str(max_update), "--save-dir", save, *flags]
    )
    return save / "checkpoint_last.pt"


@pytest.fixture(scope="session")
def mt_checkpoints(mt_data, tmp_path_factory):
    return {
        combo[:3]: _train_mt(mt_data, tmp_path_factory.mktemp("mt_" + "_".join(combo[:3])), *combo)
        for combo in _mt_combinations()
    }


@pytest.mark.slow
@pytest.mark.parametrize("combo", [c[:3] for c in _mt_combinations()], ids="-".join)
def test_translation_train_generate_and_cache(combo, mt_data, mt_checkpoints, tmp_path):
    ckpt = mt_checkpoints[combo]
    hyps = generate(
        [
            mt_data,
            "--path",
            ckpt,
            "--beam",
            "2",
            "--batch-size",
            "3",
            "--cpu",
            "--gen-subset",
            "valid",
            "--max-len-b",
            "12",
            "--num-workers",
            "0",
            *NO_DROP,
        ],
        tmp_path / "gen",
    )
    assert len(hyps) == N_VALID
    models, cfg, task = load_lm(ckpt, mt_data)
    layer = models[0].decoder.layers[0]
    assert isinstance(models[0].encoder.layers[0].self_attn, INFOS[combo[0]].cls)
    assert isinstance(layer.self_attn, INFOS[combo[1]].cls) and isinstance(layer.encoder_attn, INFOS[combo[2]].cls)
    if all(INFOS[n].capabilities.incremental for n in combo[1:]):
        assert_cache_equals_full_recompute(models, task, first_batch(task, "valid"))


@pytest.mark.slow
def test_resume_from_checkpoint_last(lm_data, tmp_path, caplog):
    args = [lm_data, "--arch", "transformer_lm_vanilla", *TINY_LM, "--save-dir", tmp_path]
    train(args + ["--max-update", "2"])
    assert torch.load(tmp_path / "checkpoint_last.pt")["optimizer_history"][-1]["num_updates"] == 2
    with caplog.at_level("INFO", logger="fairseq"):  # require_fairseq() quiets the fairseq logger to WARNING
        train(args + ["--max-update", "4"])
    assert "Loaded checkpoint" in caplog.text and "@ 2 updates" in caplog.text
    assert torch.load(tmp_path / "checkpoint_last.pt")["optimizer_history"][-1]["num_updates"] == 4


@pytest.mark.slow
def test_cli_lm_train_eval_generate(lm_data, tmp_path):
    """The console scripts themselves, with --user-dir, and safe checkpoint loading (no env override)."""
    run_cli(
        "fairseq-train",
        [
            lm_data,
            "--user-dir",
            fh.PLUGIN,
            "--arch",
            "transformer_lm_vanilla",
            *TINY_LM,
            "--max-update",
            "2",
            "--save-dir",
            tmp_path / "ck",
            "--attn-num-kv-heads",
            "2",
        ],
    )
    ckpt = tmp_path / "ck" / "checkpoint_last.pt"
    out = run_cli(
        "fairseq-eval-lm",
        [
            lm_data,
            "--user-dir",
            fh.PLUGIN,
            "--path",
            ckpt,
            "--tokens-per-sample",
            TOKENS_PER_SAMPLE,
            "--cpu",
            "--batch-size",
            "4",
            *NO_DROP,
        ],
    )
    assert "Perplexity" in out.stdout + out.stderr
    out = run_cli(
        "fairseq-generate",
        [
            lm_data,
            "--user-dir",
            fh.PLUGIN,
            "--task",
            "language_modeling",
            "--path",
            ckpt,
            "--beam",
            "2",
            "--max-len-b",
            "5",
            "--batch-size",
            "2",
            "--cpu",
            "--sample-break-mode",
            "eos",
            "--prefix-size",
            "3",
            "--tokens-per-sample",
            TOKENS_PER_SAMPLE,
            "--gen-subset",
            "test",
            *NO_DROP,
        ],
    )
    assert sum(ln.startswith("H-") for ln in out.stdout.splitlines()) == N_VALID


@pytest.mark.slow
def test_cli_translation_generate_and_interactive(mt_data, mt_checkpoints):
    ckpt = mt_checkpoints[("vanilla",) * 3]
    out = run_cli(
        "fairseq-generate",
        [
            mt_data,
            "--user-dir",
            fh.PLUGIN,
            "--path",
            ckpt,
            "--beam",
            "2",
            "--batch-size",
            "3",
            "--cpu",
            "--gen-subset",
            "valid",
            "--max-len-b",
            "8",
            *NO_DROP,
        ],
    )
    assert sum(ln.startswith("H-") for ln in out.stdout.splitlines()) == N_VALID
    out = run_cli(
        "fairseq-interactive",
        [
            mt_data,
            "--user-dir",
            fh.PLUGIN,
            "--path",
            ckpt,
            "--beam",
            "2",
            "--cpu",
            "--source-lang",
            "src",
            "--target-lang",
            "tgt",
            "--max-len-b",
            "8",
            *NO_DROP,
        ],
        stdin="s1 s2 s3 |\ns4 s5 |\n",
    )
    assert sum(ln.startswith("H-") for ln in out.stdout.splitlines()) == 2


@pytest.mark.slow
def test_checkpoints_need_exactly_the_allow_list(mt_checkpoints, lm_checkpoint):
    """Without the allow-list torch's safe loading rejects a translation checkpoint (its legacy
    argparse.Namespace); with it, both models' checkpoints load with weights_only=True."""
    mt, lm = mt_checkpoints[("vanilla",) * 3], lm_checkpoint("vanilla")
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        with pytest.raises(Exception, match="argparse.Namespace"):
            torch.load(mt, map_location="cpu", weights_only=True)
        efficient_fairseq.allow_fairseq_checkpoints()
        assert set(torch.serialization.get_safe_globals()) == {argparse.Namespace}
        for ckpt in (mt, lm):
            torch.load(ckpt, map_location="cpu", weights_only=True)
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


@pytest.mark.slow
def test_hydra_train(lm_data, tmp_path):
    out = run_cli(
        "fairseq-hydra-train",
        [
            "--config-dir",
            ROOT / "examples/fairseq/hydra",
            "--config-name",
            "efficient_lm",
            f"task.data={lm_data}",
            f"common.user_dir={fh.PLUGIN}",
            "model.decoder_attention=vanilla",
            "+model.attn_num_kv_heads=2",
            "dataset.required_batch_size_multiple=1",
            "model.decoder_layers=1",
            f"model.decoder_embed_dim={EMBED_DIM}",
            f"model.decoder_input_dim={EMBED_DIM}",
            f"model.decoder_output_dim={EMBED_DIM}",
            f"task.tokens_per_sample={TOKENS_PER_SAMPLE}",
            "optimization.max_update=2",
            f"checkpoint.save_dir={tmp_path / 'ck'}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        cwd=tmp_path,
    )
    assert "decoder self-attention: vanilla (num_kv_heads=2)" in out.stdout + out.stderr
    state = torch.load(tmp_path / "ck" / "checkpoint_last.pt")
    assert state["cfg"]["model"]["_name"] == "efficient_transformer_lm"
    assert state["cfg"]["model"]["attn_num_kv_heads"] == 2


class _PlainVanilla(MultiheadAttention):
    """Test-only: vanilla's math, declaring neither incremental decoding nor attention weights."""

    capabilities = dataclasses.replace(
        MultiheadAttention.capabilities, incremental=False, need_weights=False, before_softmax=False
    )


@pytest.mark.slow
def test_mechanisms_without_cache_or_weights_generate_the_same(mt_data, mt_checkpoints, monkeypatch):
    """A decoder mechanism without incremental decoding recomputes the prefix, and a cross mechanism
    without weights is asked for none: same weights, same hypotheses as vanilla with its cache."""
    from fairseq import checkpoint_utils
    from fairseq.sequence_generator import SequenceGenerator

    monkeypatch.setitem(registry._REGISTRY, "toy_plain", _PlainVanilla)
    monkeypatch.setattr(_PlainVanilla, "attention_name", "toy_plain", raising=False)
    ckpt = str(mt_checkpoints[("vanilla",) * 3])
    ref_models, _, task = checkpoint_utils.load_model_ensemble_and_task([ckpt], arg_overrides={"data": str(mt_data)})
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task(
        [ckpt], arg_overrides={"data": str(mt_data), "decoder_attention": "toy_plain", "cross_attention": "toy_plain"}
    )
    layer = models[0].decoder.layers[0]
    assert type(layer.self_attn) is _PlainVanilla and type(layer.encoder_attn) is _PlainVanilla
    assert not models[0].decoder.cached_decoding and not layer.cross_weights
    sample = first_batch(task, "valid")
    hyps = []
    for ms in (ref_models, models):
        for m in ms:
            m.eval()
        gen = SequenceGenerator(ms, task.target_dictionary, beam_size=2, max_len_b=10)
        with torch.no_grad():
            hyps.append(gen.generate(ms, sample))
    for ref, got in zip(*hyps):
        assert [h["tokens"].tolist() for h in ref] == [h["tokens"].tolist() for h in got]
        for a, b in zip(ref, got):
            torch.testing.assert_close(a["positional_scores"], b["positional_scores"], atol=1e-4, rtol=1e-4)
        assert ref[0]["attention"].numel() > 0 and got[0]["attention"].numel() == 0


# ------------------------------------------------- issue 15: train and generate
@pytest.fixture(scope="session")
def short_and_long_lines(tmp_path_factory):
    """10- and 100-token lines: in a batch of all 8 (--sample-break-mode eos) the short lines are padded by 90."""
    root = tmp_path_factory.mktemp("fairseq_10_100")
    words = [f"w{i}" for i in range(20)]
    for split, n in (("train", 8), ("valid", 4), ("test", 4)):
        lines = [" ".join(words[(i + j) % 20] for j in range(10 if i % 2 == 0 else 100)) for i in range(n)]
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    run_cli(
        "fairseq-preprocess",
        [
            "--only-source",
            "--trainpref",
            root / "train.txt",
            "--validpref",
            root / "valid.txt",
            "--testpref",
            root / "test.txt",
            "--destdir",
            root / "bin",
            "--workers",
            "1",
        ],
    )
    return root / "bin"


@pytest.mark.slow
def test_causal_ls_trains_with_long_right_padding(short_and_long_lines, tmp_path):
    """Issue 15 item 4: this command stopped at update 1 with 'gradients are Nan/Inf' (rows that see nothing)."""
    train(
        [
            short_and_long_lines,
            "--task",
            "language_modeling",
            "--arch",
            "transformer_lm_causal_ls",
            "--attn-window-size",
            "4",
            "--attn-chunk-size",
            "4",
            "--attn-num-landmarks",
            "1",
            "--sample-break-mode",
            "eos",
            "--decoder-layers",
            "1",
            "--decoder-embed-dim",
            str(EMBED_DIM),
            "--decoder-ffn-embed-dim",
            "32",
            "--decoder-attention-heads",
            str(NUM_HEADS),
            "--tokens-per-sample",
            "128",
            "--batch-size",
            "8",
            "--required-batch-size-multiple",
            "1",
            "--optimizer",
            "adam",
            "--lr",
            "0.003",
            "--max-update",
            "4",
            "--cpu",
            "--no-epoch-checkpoints",
            "--no-progress-bar",
            "--num-workers",
            "0",
            "--seed",
            "1",
            "--save-dir",
            tmp_path,
        ]
    )
    state = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu")
    assert state["optimizer_history"][-1]["num_updates"] == 4


def _lm_arches():
    """Every ``transformer_lm_*`` arch the plugin registered (with the mechanism's default options)."""
    from fairseq.models import ARCH_MODEL_REGISTRY

    return sorted(a for a in ARCH_MODEL_REGISTRY if a.startswith("transformer_lm_") and a[15:] in INFOS)


@pytest.mark.slow
@pytest.mark.parametrize("arch", _lm_arches())
def test_every_lm_arch_trains_and_generates_with_default_options(arch, lm_data, tmp_path):
    """Issue 15: fairseq-generate works for every transformer_lm_* arch, with the mechanism's defaults."""
    train([lm_data, "--arch", arch, *TINY_LM, "--max-update", "1", "--save-dir", tmp_path / "ck"])
    ckpt = tmp_path / "ck" / "checkpoint_last.pt"
    hyps = generate(
        [
            lm_data,
            "--task",
            "language_modeling",
            "--path",
            ckpt,
            "--beam",
            "2",
            "--max-len-b",
            "4",
            "--batch-size",
            "2",
            "--cpu",
            "--sample-break-mode",
            "eos",
            "--prefix-size",
            "2",
            "--tokens-per-sample",
            TOKENS_PER_SAMPLE,
            "--gen-subset",
            "test",
            "--num-workers",
            "0",
            *NO_DROP,
        ],
        tmp_path / "gen",
    )
    assert len(hyps) == N_VALID
