"""fairseq 0.12 data-parallel training with the plugin on the CPU: 2 gloo processes equal 1 process.

What fairseq 0.12 allows on the CPU (reproduced by the tests below and in docs/distributed.md):

* its own launcher (``--distributed-world-size 2 --cpu``) spawns ``min(torch.cuda.device_count(), 2) = 0``
  processes after asserting ``world size <= torch.cuda.device_count()``: it cannot start;
* ``torchrun`` with ``--distributed-world-size 2``: fairseq computes ``rank % torch.cuda.device_count()``:
  ``ZeroDivisionError`` (without it, each process trains alone: the default world size is the GPU count);
* launched by hand (``--distributed-init-method tcp://... --distributed-rank R --distributed-no-spawn``,
  ``--distributed-backend gloo``), ``--ddp-backend c10d`` builds ``DistributedDataParallel(device_ids=[0])``,
  which PyTorch refuses for a CPU module; ``--ddp-backend legacy_ddp`` (fairseq's own bucketed
  all-reduce of the gradients over c10d) trains.

So the test launches two ``fairseq-train`` processes by hand with ``legacy_ddp`` and checks that the
losses and the trained weights equal one process with ``--update-freq 2`` on the same batches.
"""

from __future__ import annotations

import json
import socket
import subprocess

import fairseq_helpers as fh
import pytest
import torch
from test_fairseq_plugin import TINY_LM, lm_data  # noqa: F401  (fixture)

NO_DROPOUT = ["--dropout", "0", "--attention-dropout", "0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(data, save, *extra):
    exe = fh.BIN / "fairseq-train"
    return [
        str(exe),
        str(data),
        *fh._user_dir(),
        "--arch",
        "transformer_lm_local",
        *TINY_LM,
        *NO_DROPOUT,
        "--max-update",
        "3",
        "--save-dir",
        str(save),
        "--log-format",
        "json",
        "--log-interval",
        "1",
        "--no-save-optimizer-state",
        *[str(e) for e in extra],
    ]


def _logged(text: str):
    """The losses fairseq logs (``--log-format json``): per update (train_inner) and per epoch (train)."""
    rows = [
        json.loads(line[line.index("{") :])
        for line in text.splitlines()
        if "| train_inner |" in line or "| train |" in line
    ]
    return [(r.get("num_updates", r.get("train_num_updates")), r.get("loss", r.get("train_loss"))) for r in rows]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def _dist_args(port, rank):
    return [
        "--distributed-world-size",
        "2",
        "--distributed-rank",
        rank,
        "--distributed-init-method",
        f"tcp://127.0.0.1:{port}",
        "--distributed-no-spawn",
        "--distributed-backend",
        "gloo",
    ]


@pytest.mark.slow
def test_two_cpu_processes_equal_one_with_update_freq_2(lm_data, tmp_path):  # noqa: F811
    one = subprocess.run(
        _cmd(lm_data, tmp_path / "one", "--update-freq", "2"), env=fh.env(), capture_output=True, text=True, timeout=600
    )
    assert one.returncode == 0, one.stderr[-4000:]
    port = _free_port()
    procs = [
        subprocess.Popen(
            _cmd(lm_data, tmp_path / "two", *_dist_args(port, r), "--ddp-backend", "legacy_ddp"),
            env=fh.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    assert "distributed init (rank 1)" in outs[1][1] + outs[1][0]
    ref, got = _weights(tmp_path / "one" / "checkpoint_last.pt"), _weights(tmp_path / "two" / "checkpoint_last.pt")
    assert ref.keys() == got.keys()
    worst = max((ref[k].float() - got[k].float()).abs().max().item() for k in ref)
    assert worst < 1e-6, f"weights after 3 updates differ by {worst}"
    ref_log, got_log = _logged(one.stdout + one.stderr), _logged(outs[0][0] + outs[0][1])
    assert len(ref_log) >= 3 and len(ref_log) == len(got_log)
    for a, b in zip(ref_log, got_log):
        assert a == b, (a, b)  # the logged losses (3 decimals) of every update and epoch


@pytest.mark.slow
def test_c10d_ddp_backend_fails_on_cpu(lm_data, tmp_path):  # noqa: F811
    """fairseq passes device_ids=[device_id] to DistributedDataParallel, which PyTorch refuses for CPU modules."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            _cmd(lm_data, tmp_path, *_dist_args(port, r), "--ddp-backend", "c10d"),
            env=fh.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode != 0 for p in procs)
    assert any("device_ids" in e for e in errs), errs[0][-3000:]
