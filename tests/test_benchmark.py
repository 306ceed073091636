"""The benchmark harness: measurement, failure handling, outputs and efficiency-length arithmetic.

Tiny sizes only; nothing here asserts a timing.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from efficient_attention import MultiheadAttention
from efficient_attention.benchmark import (
    SweepConfig,
    cpu_peak_bytes,
    efficiency_lengths,
    fit_curve,
    fitted_crossing,
    measure_point,
    measured_crossing,
    run_sweep,
    write_outputs,
)
from efficient_attention.benchmark.cli import parse_lengths, parse_option
from efficient_attention.benchmark.efficiency import choose_degree
from efficient_attention.benchmark.measure import parse_pattern
from efficient_attention.capabilities import Pattern

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384]
TINY = dict(batch=1, heads=2, dim=8, warmup=1, repeats=2, budget=30.0, isolation="none")


class FakeOOM(MultiheadAttention):
    """Runs out of memory from 32 tokens on."""

    def _attend(self, q, k, v, masks, need_weights):
        if q.shape[2] >= 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB (simulated)")
        return super()._attend(q, k, v, masks, need_weights)


class FakeReject(MultiheadAttention):
    """Rejects exactly one length, accepts the others."""

    def _attend(self, q, k, v, masks, need_weights):
        if q.shape[2] == 32:
            raise ValueError("length 32 is not a multiple of the block size (simulated)")
        return super()._attend(q, k, v, masks, need_weights)


class FakeSlow(MultiheadAttention):
    """Every call takes 0.2 s."""

    def _attend(self, q, k, v, masks, need_weights):
        time.sleep(0.2)
        return super()._attend(q, k, v, masks, need_weights)


class FakeColdStart(MultiheadAttention):
    """The first call of each module takes 0.3 s (one-time set-up), the others are fast."""

    def _attend(self, q, k, v, masks, need_weights):
        if not getattr(self, "_warm", False):
            self._warm = True
            time.sleep(0.3)
        return super()._attend(q, k, v, masks, need_weights)


def _by(result, mechanism, mode="forward"):
    return {p["length"]: p for p in result["points"] if p["mechanism"] == mechanism and p["mode"] == mode}


# ------------------------------------------------------------ measurement
def test_cpu_peak_bytes_counts_tensor_allocations_exactly():
    def fn():
        a = torch.ones(1_000_000)  # 4 MB
        b = torch.ones(500_000)  # +2 MB -> peak 6 MB
        del a
        c = torch.ones(250_000)  # 3 MB live
        return b, c

    assert cpu_peak_bytes(fn) == 6_000_000


@pytest.mark.parametrize("mode", ["forward", "backward", "decode"])
@pytest.mark.parametrize("mechanism", ["vanilla", "naive"])
def test_measure_point_reports_time_and_memory(mechanism, mode):
    point = dict(
        mechanism=mechanism, pattern="causal self", mode=mode, length=64, dtype="float32", device="cpu", **TINY
    )
    res = measure_point(point)
    assert res["status"] == "ok", res
    assert res["time_s"] > 0 and len(res["times_s"]) == 2 and res["mem_peak_bytes"] > 0
    if mode == "decode":  # the key/value cache of the 64-token context: 2 x (B, H, L, d) floats
        assert res["state_bytes"] == 2 * 1 * 2 * 64 * 8 * 4


def test_naive_baseline_materialises_scores_vanilla_does_not():
    point = dict(pattern="noncausal self", mode="forward", length=256, dtype="float32", device="cpu", **TINY)
    naive = measure_point(dict(point, mechanism="naive"))["mem_peak_bytes"]
    vanilla = measure_point(dict(point, mechanism="vanilla"))["mem_peak_bytes"]
    scores = 1 * 2 * 256 * 256 * 4  # one (B, H, T, S) fp32 matrix
    q = torch.randn(1, 2, 256, 4)
    if cpu_peak_bytes(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)) >= scores:
        pytest.skip("this torch's CPU SDPA materialises the scores itself (torch 2.11 does at this shape)")
    assert naive - vanilla >= scores


# ------------------------------------------------------------ the sweep
def test_sweep_end_to_end_writes_json_markdown_and_png(tmp_path):
    config = SweepConfig(
        mechanisms=["vanilla"], patterns=["causal-self", "noncausal-cross"], lengths=(16, 32, 64), **TINY
    )
    result = run_sweep(config, checkpoint=tmp_path / "partial.json")
    paths = write_outputs(result, tmp_path)
    data = json.loads(Path(paths["json"]).read_text())
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["threads"] >= 1
    assert data["machine"]["devices"]["cpu"]["name"]
    modes = {(p["mechanism"], p["pattern"], p["mode"]) for p in data["points"]}
    assert len(modes) == 2 * 2 * 3  # 2 baselines x 2 patterns x 3 modes (both decode)
    assert len(data["points"]) == 12 * 3
    assert all(p["status"] == "ok" for p in data["points"]), [p for p in data["points"] if p["status"] != "ok"]
    assert any(r["mechanism"] == "vanilla" and r["baseline"] == "naive" for r in data["efficiency"])
    assert json.loads((tmp_path / "partial.json").read_text())["points"]
    pngs = [Path(p) for p in paths["plots"]]
    assert {p.name for p in pngs} == {"time_cpu_float32.png", "memory_cpu_float32.png", "decode_cpu_float32.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = Path(paths["markdown"]).read_text()
    assert "## Efficiency length" in md and "| `vanilla` |" in md


def test_sweep_records_oom_and_errors_and_goes_on():
    config = SweepConfig(
        mechanisms=["fake_oom", "fake_reject"],
        patterns=["noncausal-self"],
        lengths=(16, 32, 64),
        modes=("forward",),
        **TINY,
    )
    result = run_sweep(config, extra={"fake_oom": FakeOOM, "fake_reject": FakeReject})
    oom = _by(result, "fake_oom")
    assert oom[16]["status"] == "ok"
    assert oom[32]["status"] == "oom" and "out of memory" in oom[32]["detail"]
    assert oom[64]["status"] == "skipped" and oom[64]["reason"] == "oom"
    reject = _by(result, "fake_reject")
    assert [reject[n]["status"] for n in (16, 32, 64)] == ["ok", "error", "ok"]
    assert "ValueError" in reject[32]["detail"]
    assert all(p["status"] == "ok" for p in result["points"] if p["mechanism"] in ("vanilla", "naive"))


def test_sweep_skips_longer_lengths_past_the_budget():
    config = SweepConfig(
        mechanisms=["fake_slow"],
        baselines=("vanilla",),
        patterns=["causal-self"],
        lengths=(16, 32, 64),
        modes=("forward",),
        **dict(TINY, repeats=5, budget=0.05),
    )
    slow = _by(run_sweep(config, extra={"fake_slow": FakeSlow}), "fake_slow")
    assert slow[16]["status"] == "ok" and slow[16]["repeats"] == 2  # over budget: timed twice, not 5 times
    assert [(slow[n]["status"], slow[n]["reason"]) for n in (32, 64)] == [("skipped", "budget")] * 2


def test_budget_ignores_warm_up_calls():
    config = SweepConfig(
        mechanisms=["fake_cold"],
        baselines=(),
        patterns=["causal-self"],
        lengths=(16, 32, 64),
        modes=("forward",),
        **dict(TINY, budget=0.1),
    )
    cold = _by(run_sweep(config, extra={"fake_cold": FakeColdStart}), "fake_cold")
    assert [(cold[n]["status"], cold[n]["repeats"]) for n in (16, 32, 64)] == [("ok", 2)] * 3


def test_sweep_skips_points_predicted_to_exceed_the_cpu_memory_cap():
    config = SweepConfig(
        mechanisms=[],
        baselines=("naive",),
        patterns=["noncausal-self"],
        lengths=(16, 32, 64),
        modes=("forward",),
        max_memory_gib=1e-9,
        **TINY,
    )
    naive = _by(run_sweep(config), "naive")
    assert naive[16]["status"] == "ok"
    assert [(naive[n]["status"], naive[n]["reason"]) for n in (32, 64)] == [("skipped", "memory")] * 2


def test_sweep_time_limit_records_the_rest_as_skipped():
    config = SweepConfig(
        mechanisms=[],
        baselines=("vanilla",),
        patterns=["causal-self"],
        lengths=(16, 32),
        modes=("forward", "backward"),
        max_time=1e-9,
        **TINY,
    )
    points = run_sweep(config)["points"]
    assert len(points) == 4
    assert all((p["status"], p["reason"]) == ("skipped", "time limit") for p in points)


def test_cli_worker_process_survives_a_killed_point(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    cmd = [
        sys.executable,
        "-m",
        "efficient_attention.benchmark",
        "--import",
        "bench_fake_mechanisms",
        "--mechanisms",
        "bench_killed",
        "--baselines",
        "vanilla",
        "--patterns",
        "causal-self",
        "--lengths",
        "16:64",
        "--modes",
        "forward",
        "--batch",
        "1",
        "--heads",
        "2",
        "--dim",
        "8",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--budget",
        "60",
        "--out",
        str(tmp_path),
        "-q",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "time vs vanilla" in proc.stdout
    data = json.loads((tmp_path / "results.json").read_text())
    killed = _by(data, "bench_killed")
    assert killed[16]["status"] == "ok"
    assert killed[32]["status"] == "error" and killed[32]["reason"] == "crash" and "SIGKILL" in killed[32]["detail"]
    assert killed[64]["status"] == "skipped"
    assert [p["status"] for p in _by(data, "vanilla").values()] == ["ok"] * 3
    assert (tmp_path / "time_cpu_float32.png").exists()


def test_broken_cuda_context_is_detected():
    from efficient_attention.benchmark.runner import context_is_broken

    assert context_is_broken(
        {"status": "error", "detail": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    )
    assert not context_is_broken({"status": "error", "detail": "ValueError: bad length"})
    assert not context_is_broken({"status": "oom", "detail": "OutOfMemoryError: CUDA out of memory"})


# --------------------------------------------------- efficiency arithmetic
def _quad(n):
    return 1e-9 * n**2 + 2e-6 * n + 1e-3


def _lin(n):
    return 5e-6 * n + 0.02


def test_fits_recover_synthetic_curves_and_their_degree():
    n = np.array(LENGTHS, dtype=float)
    q, l = fit_curve(n, _quad(n)), fit_curve(n, _lin(n))
    assert q.degree == 2 and l.degree == 1
    np.testing.assert_allclose(q.coeffs, [1e-3, 2e-6, 1e-9], rtol=1e-6)
    np.testing.assert_allclose(l.coeffs, [0.02, 5e-6], rtol=1e-6)
    assert choose_degree(n, 3 * n) == 1 and choose_degree(n, n**2) == 2


def test_fitted_crossing_solves_quadratic_against_linear():
    n = np.array(LENGTHS, dtype=float)
    c = fitted_crossing(fit_curve(n, _lin(n)), fit_curve(n, _quad(n)), LENGTHS)
    # 1e-9 n^2 - 3e-6 n - 0.019 = 0
    expected = (3e-6 + math.sqrt(9e-12 + 4 * 1e-9 * 0.019)) / 2e-9
    assert c.status == "at" and c.length == pytest.approx(expected, rel=1e-6) and not c.extrapolated
    assert 256 < expected < 16384


def test_fitted_crossing_always_never_and_extrapolated():
    n = np.array(LENGTHS, dtype=float)
    base = fit_curve(n, _quad(n))
    assert fitted_crossing(fit_curve(n, 0.5 * _quad(n)), base, LENGTHS).status == "always"
    assert fitted_crossing(fit_curve(n, 2 * _quad(n)), base, LENGTHS).status == "never"
    far = fitted_crossing(fit_curve(n, 1e-5 * n + 1.0), base, LENGTHS)  # crosses near 4.1e4
    assert (
        far.status == "at"
        and far.extrapolated
        and far.length == pytest.approx((8e-6 + math.sqrt(64e-12 + 4e-9 * 0.999)) / 2e-9, rel=1e-6)
    )


def test_measured_crossing_interpolates_the_ratio_log_log():
    # mechanism a*n, baseline b*n^2: the ratio 500/n is a power law, crossing exactly at 500
    mech = [1e-3 * n for n in LENGTHS]
    base = [2e-6 * n**2 for n in LENGTHS]
    c = measured_crossing(LENGTHS, mech, base)
    assert c.status == "at" and c.length == pytest.approx(500.0, rel=1e-9) and c.first_length == 512


def test_measured_crossing_cases():
    lengths = [16, 32, 64, 128]
    assert measured_crossing(lengths, [1, 1, 1, 1], [2, 2, 2, 2]).status == "always"
    assert measured_crossing(lengths, [1, 1, 1, 3], [2, 2, 2, 2]).status == "none"
    # cheaper at 32 only, then more expensive again: no crossing from which it stays cheaper
    assert measured_crossing(lengths, [3, 1, 3, 3], [2, 2, 2, 2]).status == "none"
    # baseline out of memory from 64 on while the mechanism runs: it wins from 64
    inf = math.inf
    c = measured_crossing(lengths, [3, 3, 3, 3], [2, 2, None, None], [None, None, inf, inf])
    assert (c.status, c.length, c.first_length) == ("at", 64.0, 64)
    # baseline skipped for budget from 64 on after costing 2 at 32: a mechanism costing 3 is not known to win
    assert measured_crossing(lengths, [3, 3, 3, 3], [2, 2, None, None], [None, None, 2, 2]).status == "none"
    # ... but one costing 1.5 there is
    c = measured_crossing(lengths, [3, 3, 1.5, 1.5], [2, 2, None, None], [None, None, 2, 2])
    assert (c.status, c.first_length) == ("at", 64)
    assert measured_crossing(lengths, [None] * 4, [1] * 4).status == "n/a"


def test_efficiency_lengths_on_synthetic_points():
    points = []
    for name, f, mem in (("vanilla", _quad, lambda n: 64.0 * n), ("lin", _lin, lambda n: 1e3 * n)):
        for n in LENGTHS:
            points.append(
                dict(
                    mechanism=name,
                    device="cpu",
                    dtype="float32",
                    pattern="causal self",
                    mode="forward",
                    length=n,
                    status="ok",
                    time_s=f(n),
                    mem_peak_bytes=mem(n),
                )
            )
    (row,) = efficiency_lengths(points, ["vanilla"])
    assert row["mechanism"] == "lin" and row["baseline"] == "vanilla"
    expected = (3e-6 + math.sqrt(9e-12 + 4 * 1e-9 * 0.019)) / 2e-9
    assert row["time"]["fitted"]["length"] == pytest.approx(expected, rel=1e-6)
    assert row["time"]["fit_degree"] == {"mechanism": 1, "baseline": 2}
    assert LENGTHS[0] < row["time"]["measured"]["length"] < LENGTHS[-1]
    assert row["memory"]["fitted"]["status"] == "never" and row["memory"]["measured"]["status"] == "none"


# ------------------------------------------------------------ arguments
def test_argument_parsing():
    assert parse_lengths("256:2048") == [256, 512, 1024, 2048]
    assert parse_lengths("100,300") == [100, 300]
    with pytest.raises(argparse.ArgumentTypeError, match="--lengths"):
        parse_lengths("0:16")
    assert (
        parse_pattern("causal-self") is Pattern.CAUSAL_SELF
        and parse_pattern("noncausal_cross") is Pattern.NONCAUSAL_CROSS
    )
    with pytest.raises(ValueError, match="unknown pattern"):
        parse_pattern("sideways")
    with pytest.raises(ValueError, match="mode"):
        SweepConfig(modes=("sideways",)).validate()
    assert parse_option("Vanilla.num_kv_heads=2") == ("vanilla", "num_kv_heads", "2")  # converted by validate()
    assert parse_option("x.mode=fast") == ("x", "mode", "fast")
    with pytest.raises(argparse.ArgumentTypeError, match="--option"):
        parse_option("novalue")
    with pytest.raises(ValueError, match="unknown attention 'nosuch'"):
        SweepConfig(mechanisms=["nosuch"]).validate()
    with pytest.raises(ValueError, match="no option 'wsize'"):
        SweepConfig(options={"vanilla": {"wsize": 3}}).validate()
    config = SweepConfig(
        options={
            "vanilla": {"num_kv_heads": "2"},
            "dilated": {"segment_lengths": "(8, 16)"},
            "cosformer": {"max_len": "None", "act_fun": "elu"},
        }
    )
    config.validate()  # the option spec converts the command line's text
    assert config.options == {
        "vanilla": {"num_kv_heads": 2},
        "dilated": {"segment_lengths": (8, 16)},
        "cosformer": {"max_len": None, "act_fun": "elu"},
    }
    with pytest.raises(ValueError, match=r"--option cosformer.act_fun: expected one of 'relu', 'elu', got 'gelu'"):
        SweepConfig(options={"cosformer": {"act_fun": "gelu"}}).validate()


def test_option_overrides_reach_the_module():
    config = SweepConfig(
        mechanisms=["vanilla"],
        baselines=(),
        patterns=["causal-self"],
        lengths=(16,),
        modes=("decode",),
        options={"vanilla": {"num_kv_heads": 1}},
        **TINY,
    )
    result = run_sweep(config)
    (point,) = result["points"]
    # multi-query: the cache holds one key/value head instead of two
    assert point["status"] == "ok" and point["state_bytes"] == 2 * 1 * 1 * 16 * 8 * 4
    assert result["mechanisms"]["vanilla"]["options"]["num_kv_heads"] == "1"


# ------------------------------------------- benchmarks/mechanisms_gpu.py
GPU_SCRIPT = ROOT / "benchmarks" / "mechanisms_gpu.py"
CAB_DIR = ROOT / ".cab" / "efficient-attention"


def _run_mechanisms_script(tmp_path, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        str(GPU_SCRIPT),
        "--smoke",
        "--out",
        str(tmp_path),
        "--mechanisms",
        "vanilla,local,s4d",
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    data = (
        json.loads((tmp_path / "mechanisms_gpu.json").read_text())
        if (tmp_path / "mechanisms_gpu.json").exists()
        else None
    )
    return proc, data


@pytest.mark.slow
def test_mechanisms_script_smoke_measures_ours_and_decoding(tmp_path):
    proc, data = _run_mechanisms_script(tmp_path, "--parts", "train,decode")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert data["device"] and data["torch"] == torch.__version__ and "triton" in data
    assert data["setting"]["autocast"] == "bfloat16" and data["setting"]["loss"] == "out.sum()"
    train = {(p["label"], p["pattern"], p["length"]): p for p in data["points"] if p["part"] == "train"}
    for key in [("vanilla", "causal self", 64), ("local", "noncausal self", 32), ("s4d", "causal self", 64)]:
        assert train[key]["status"] == "ok" and train[key]["time_s"] > 0, train[key]
        assert train[key]["options"] == ({"wsize": 128} if key[0] == "local" else {})
    decode = {(p["label"], p["length"]): p for p in data["points"] if p["part"] == "decode"}
    for name in ("vanilla", "local", "s4d"):
        assert decode[(name, 64)]["status"] == "ok" and decode[(name, 64)]["repeats"] == 2, decode[(name, 64)]
    assert "SDPA/ours" in proc.stdout and "decoding step" in proc.stdout
    assert any(line.startswith("local") and "flat" in line for line in proc.stdout.splitlines())  # decode verdicts


def test_mechanisms_script_without_cab_records_skips(tmp_path):
    proc, data = _run_mechanisms_script(tmp_path, "--parts", "cab", "--cab-dir", str(tmp_path / "no-cab"))
    assert proc.returncode == 1  # nothing measured: every point skipped
    assert data["points"] and all((p["status"], p["reason"]) == ("skipped", "no CAB") for p in data["points"])
    assert {(p["label"], p["cab_class"]) for p in data["points"]} == {("local", "LocalAttention"), ("s4d", "S4D")}


@pytest.mark.slow
@pytest.mark.skipif(not CAB_DIR.is_dir(), reason="CAB is not copied into .cab/ (see benchmarks/README.md)")
def test_mechanisms_script_times_cab_in_its_own_process(tmp_path):
    proc, data = _run_mechanisms_script(tmp_path, "--parts", "train,cab")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cab = {(p["label"], p["pattern"], p["length"]): p for p in data["points"] if p["part"] == "cab"}
    for key in [("local", "causal self", 64), ("s4d", "noncausal self", 32), ("s4d", "causal self", 64)]:
        assert cab[key]["status"] == "ok" and cab[key]["time_s"] > 0, cab[key]
    assert data["info"]["cab"]["ready"]
    # the CAB ratio column is filled for local
    row = next(line for line in proc.stdout.splitlines() if line.startswith("local") and "causal" in line)
    assert row.split()[-1] not in ("-", "")


# ------------------------------------------------------------ the CLI
def test_cli_list_options_take_spaces_commas_or_both():
    from efficient_attention.benchmark.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        [
            "--mechanisms",
            "local",
            "performer,abc",
            "--lengths",
            "64",
            "128,256",
            "512:1024",
            "--patterns",
            "causal-self",
            "noncausal-self",
            "--modes",
            "forward",
            "decode",
            "--dtype",
            "float32",
            "float64",
        ]
    )
    config = config_from_args(args)
    assert config.mechanisms == ["local", "performer", "abc"]
    assert config.lengths == (64, 128, 256, 512, 1024)
    assert config.patterns == ["causal-self", "noncausal-self"] and config.modes == ("forward", "decode")
    assert config.dtypes == ("float32", "float64")
    assert build_parser().parse_args(["--mechanisms", "local,performer"]).mechanisms == ["local", "performer"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--lengths", "64", "0:16"])


def test_cli_exits_nonzero_when_every_point_of_the_mechanisms_failed(tmp_path, capsys):
    from efficient_attention.benchmark.cli import main

    common = [
        "--lengths",
        "16",
        "--modes",
        "forward",
        "--patterns",
        "causal-self",
        "--batch",
        "1",
        "--heads",
        "2",
        "--dim",
        "8",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--isolation",
        "none",
        "-q",
    ]
    bad = main(
        ["--mechanisms", "performer", "--option", "performer.approx_attn_dim=-1", "--out", str(tmp_path / "a"), *common]
    )
    assert bad == 1
    assert "every point of performer failed" in capsys.readouterr().err
    assert main(["--mechanisms", "performer", "--out", str(tmp_path / "b"), *common]) == 0


def test_all_failed_reasons():
    from efficient_attention.benchmark.cli import all_failed

    cfg = {"config": {"baselines": ["vanilla"]}}
    assert all_failed({**cfg, "points": []}) == "the sweep has no points"
    assert "every point failed" in all_failed({**cfg, "points": [{"mechanism": "vanilla", "status": "error"}]})
    assert all_failed({**cfg, "points": [{"mechanism": "vanilla", "status": "ok"}]}) is None
    assert (
        all_failed({**cfg, "points": [{"mechanism": "vanilla", "status": "ok"}, {"mechanism": "x", "status": "oom"}]})
        == "every point of x failed or was skipped"
    )


def test_progress_lines_carry_an_eta_and_no_profiler_lines(caplog, capfd):
    import logging

    from efficient_attention.benchmark.sweep import eta_seconds

    assert eta_seconds(2, 10, 20.0) == pytest.approx(80.0)
    assert eta_seconds(2, 10, 20.0, max_time=50.0) == pytest.approx(30.0)
    config = SweepConfig(
        mechanisms=[], baselines=("vanilla",), patterns=["causal-self"], lengths=(16, 32), modes=("forward",), **TINY
    )
    with caplog.at_level(logging.INFO, logger="efficient_attention.benchmark.sweep"):
        run_sweep(config)
    lines = [r.getMessage() for r in caplog.records if "L=" in r.getMessage()]
    assert len(lines) == 2 and all("ETA" in line for line in lines), lines
    assert "profiler_st" not in capfd.readouterr().err  # the CPU memory measurement's profiler stays quiet


def test_plot_titles_name_the_device_and_the_setting():
    from efficient_attention.benchmark.report import figure_title

    result = {
        "config": {"batch": 4, "heads": 8, "dim": 64, "repeats": 5, "warmup": 2},
        "machine": {"devices": {"cuda": {"name": "NVIDIA H200"}}, "threads": 16},
    }
    title = figure_title(result, "time", "cuda", "bfloat16")
    assert title.startswith("Time: NVIDIA H200, bfloat16\n")
    assert "batch 4, 8 heads x 64 dims" in title and "median of 5 calls after 2 warm-up" in title


def test_mechanisms_cpu_script_interleaves_rounds_and_compares(tmp_path):
    script = ROOT / "benchmarks" / "mechanisms_cpu.py"
    base = [
        sys.executable,
        str(script),
        "--length",
        "32",
        "--heads",
        "2",
        "--dim",
        "8",
        "--rounds",
        "2",
        "--threads",
        "1",
        "--mechanisms",
        "vanilla",
        "local",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run(base + ["--out", str(tmp_path / "a")], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    data = json.loads((tmp_path / "a" / "mechanisms_cpu.json").read_text())
    assert data["setting"]["interleaved"] and data["rounds_done"] == 2
    assert {(p["mechanism"], p["pattern"]) for p in data["points"]} == {
        ("vanilla", "noncausal self"),
        ("vanilla", "causal self"),
        ("local", "noncausal self"),
        ("local", "causal self"),
    }
    assert all(p["status"] == "ok" and len(p["times_s"]) == 2 for p in data["points"])
    assert next(p for p in data["points"] if p["mechanism"] == "local")["options"] == {"wsize": 128}
    second = subprocess.run(
        base + ["--out", str(tmp_path / "b"), "--compare", str(tmp_path / "a" / "mechanisms_cpu.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 0 and "after/before" in second.stdout


class FakeContextRecorder(MultiheadAttention):
    """Records the number of keys every call attends to."""

    seen = []

    def _attend(self, q, k, v, masks, need_weights):
        FakeContextRecorder.seen.append(k.shape[2])
        return super()._attend(q, k, v, masks, need_weights)


def test_decode_steps_are_timed_at_the_same_context_then_growing():
    FakeContextRecorder.seen = []
    point = dict(
        mechanism="fake_ctx",
        pattern="causal self",
        mode="decode",
        length=16,
        dtype="float32",
        device="cpu",
        **dict(TINY, warmup=2, repeats=3),
    )
    res = measure_point(point, {"fake_ctx": FakeContextRecorder})
    assert res["status"] == "ok" and res["repeats"] == 3 and res["cost_s"] == min(res["times_s"])
    # 2 warm-up + 3 timed + 1 memory call, each from the restored 16-token state; then 8 consecutive steps
    assert FakeContextRecorder.seen == [17] * 6 + list(range(17, 25))
    assert len(res["steps_growing_s"]) == 8 and res["step_growing_s"] > 0
