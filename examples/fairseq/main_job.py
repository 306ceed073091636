#!/usr/bin/env python
"""The main job: train fairseq LMs with several mechanisms on a long-range task, on the CPU, and compare them.

The corpus (``make_corpus.py --task copy``, 33-token lines ``x1 .. x16 | x1 .. x16`` of distinct symbols,
one line per sample) puts every answer exactly 16 positions behind the query that predicts it.
``local`` runs with an exact 6-token window (``--attn-wsize 6 --attn-exact-windowsize true``): its two
layers reach at most 12 tokens back, so it cannot copy; mechanisms that see the whole line (vanilla,
performer, ...) can. ``--task longrange`` adds multi-query associative recall lines
``k1 v1 .. k10 v10 ? ka va kb vb ..`` (scored on the first queried value); they need far more updates
(vanilla's loss on them had only begun to fall after 1,200).

For each mechanism the job runs the real fairseq programs with the plugin (two mechanisms at a time,
one thread each, where there are two cores):

1. ``fairseq-train --arch transformer_lm_<name>`` (streaming its progress; validation at the end);
2. ``fairseq-generate`` with beam search (beam 2, the mechanism's incremental decoding) completing the
   copy prompts after their ``|`` (and recall prompts after their first ``? key``);

then prints a table: per mechanism the accuracy on each task (share of answer tokens generated right),
training time, validation perplexity, parameters, tokens/s and peak memory; a row with each task's
chance level; and one line saying what the table shows.

    python examples/fairseq/main_job.py                       # default mechanisms
    python examples/fairseq/main_job.py --mechanisms vanilla,local,dilated --max-update 800

The default list skips names that are not registered (or cannot do causal self attention);
``--mechanisms`` overrides it.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import make_corpus  # noqa: E402

# preferred order; names that are not registered are skipped
DEFAULT_MECHANISMS = (
    "vanilla",
    "performer",
    "local",
    "abc",
    "s4d",
    "cosformer",
    "block_sparse",
    "dilated",
    "longshort",
    "landmark",
    "blockwise",
)
DEFAULT_COUNT = 3
LOCAL_WINDOW = 6  # exact window: each layer sees the previous 6 tokens, two layers 12
# per-mechanism flags: a window too short for the copy distance (the point of the comparison)
MECHANISM_FLAGS = {"local": ["--attn-wsize", LOCAL_WINDOW, "--attn-exact-windowsize", "true"]}
LEARNED = 0.5  # accuracy at or above which a task counts as learned (well above every chance level here)
_PRINT = threading.Lock()


def log(msg: str) -> None:
    with _PRINT:
        print(f"[main-job {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fairseq_env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "plugins"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(paths).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def program(name: str) -> List[str]:
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return [str(exe)]
    module = name.split("-", 1)[1].replace("-", "_")
    return [sys.executable, "-c", f"import sys; from fairseq_cli.{module} import cli_main; sys.exit(cli_main())"]


def run(name: str, args: List, threads: int, echo=None) -> Tuple[str, float]:
    """Run a fairseq program; returns (its output, peak RSS in MiB). ``echo(line)`` gives the text to show live."""
    cmd = program(name) + [str(a) for a in args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=fairseq_env(threads))
    out = []
    for line in proc.stdout:
        out.append(line)
        shown = echo(line) if echo is not None else None
        if shown:
            with _PRINT:
                print(shown, flush=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = "".join(out)
    if proc.returncode != 0:
        sys.stderr.write(text[-5000:])
        raise SystemExit(f"{name} failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return text, usage.ru_maxrss / 1024.0


def choose_mechanisms(requested: Optional[str]) -> List[str]:
    from efficient_attention import Pattern, available_attentions

    infos = available_attentions()
    causal = [n for n, i in infos.items() if i.capabilities.supports(Pattern.CAUSAL_SELF)]
    if requested:
        names = [n.strip() for n in requested.split(",") if n.strip()]
        bad = [n for n in names if n not in causal]
        if bad:
            raise SystemExit(
                f"not registered or not causal-capable: {', '.join(bad)}; choose from: {', '.join(causal)}"
            )
        return names
    chosen = [n for n in DEFAULT_MECHANISMS if n in causal]
    chosen += [n for n in causal if n not in chosen]  # anything else registered, if the list runs short
    return chosen[:DEFAULT_COUNT]


def tasks_of(args) -> Tuple[str, ...]:
    return make_corpus.MIXES.get(args.task, (args.task,))


def prompt(task: str, rng: random.Random, length: int) -> Tuple[List[str], List[str]]:
    """A test prompt and the answer it is scored on: mqar is scored on the first queried value only."""
    src, tgt = make_corpus.MAKERS[task](rng, length)
    return src, (tgt[:1] if task == "mqar" else tgt)


def chance(task: str, src: List[str]) -> float:
    """Accuracy of guessing uniformly among the candidates the line itself offers."""
    if task == "copy":
        return 1 / len(set(src[:-1]))
    if task in ("recall", "mqar"):
        return 1 / len({t for t in src if t.startswith("v")})
    return 1 / 10  # listops: a digit


def make_data(work: Path, args) -> Tuple[Path, Dict[str, Dict]]:
    """The preprocessed corpus and, per task, its test prompts (``subset``, ``prefix`` length, ``answers``)."""
    data, raw = work / "data-bin", work / "raw"
    rng = random.Random(f"{args.seed}-prompts")
    prompts = {}
    for i, task in enumerate(tasks_of(args), 1):
        examples = [prompt(task, rng, args.max_len) for _ in range(args.prompts)]
        prompts[task] = {
            "subset": f"test{i}",
            "lines": [src + ans for src, ans in examples],
            "prefix": len(examples[0][0]),
            "answer": len(examples[0][1]),
            "chance": sum(chance(task, src) for src, _ in examples) / len(examples),
        }
    if (data / "dict.txt").exists():
        log(f"reusing the preprocessed corpus in {data}")
        return data, prompts
    log(
        f"generating the synthetic corpus ({args.task}: {', '.join(tasks_of(args))}; {args.min_len}-{args.max_len} "
        f"tokens a line, {args.train_lines} training lines, seed {args.seed}) in {raw}"
    )
    sizes = {"train": args.train_lines, "valid": args.valid_lines, "test": args.valid_lines}
    make_corpus.write_corpus(raw, args.task, "lm", sizes, args.min_len, args.max_len, args.seed)
    for task, p in prompts.items():
        (raw / f"prompts_{task}.txt").write_text("".join(" ".join(line) + "\n" for line in p["lines"]))
    log("fairseq-preprocess")
    tests = ",".join(str(raw / f) for f in ("test.txt", *(f"prompts_{t}.txt" for t in prompts)))
    run(
        "fairseq-preprocess",
        [
            "--only-source",
            "--trainpref",
            raw / "train.txt",
            "--validpref",
            raw / "valid.txt",
            "--testpref",
            tests,
            "--destdir",
            data,
            "--workers",
            "1",
        ],
        args.threads,
    )
    return data, prompts


def count_params(text: str) -> int:
    m = re.search(r"num\. shared model params: ([\d,]+)", text)
    return int(m.group(1).replace(",", "")) if m else -1


def last_metric(text: str, key: str, tag: str = "| train |") -> float:
    vals = [ln for ln in text.splitlines() if tag in ln and f" {key} " in ln]
    if not vals:
        return float("nan")
    m = re.search(rf"\b{key} ([\d.]+|inf|nan)", vals[-1])
    return float(m.group(1)) if m else float("nan")


def hypotheses(text: str) -> Dict[int, List[str]]:
    hyps = {}
    for ln in text.splitlines():
        if ln.startswith("H-"):
            idx, _, toks = ln.split("\t", 2)
            hyps[int(idx[2:])] = toks.split()
    return hyps


def answer_accuracy(text: str, lines: List[List[str]], prefix: int, answer: int) -> float:
    """Share of the ``answer`` tokens after the first ``prefix`` of each line that were generated right."""
    hyps = hypotheses(text)
    right = total = 0
    for i, line in enumerate(lines):
        target = line[prefix : prefix + answer]
        got = hyps.get(i, [])[prefix : prefix + answer]
        right += sum(a == b for a, b in zip(got, target))
        total += len(target)
    return right / max(total, 1)


def generate(name: str, task: str, p: Dict, data: Path, ckpt: Path, common: List, args) -> float:
    """Beam search completing the ``task`` prompts after their question; the answers' accuracy."""
    out, _ = run(
        "fairseq-generate",
        [
            data,
            *common,
            "--task",
            "language_modeling",
            "--path",
            ckpt,
            "--gen-subset",
            p["subset"],
            "--beam",
            "2",
            "--sample-break-mode",
            "eos",
            "--prefix-size",
            p["prefix"],
            "--max-len-b",
            p["prefix"] + p["answer"] + 1,
            "--batch-size",
            len(p["lines"]),
            "--required-batch-size-multiple",
            "1",
            "--tokens-per-sample",
            args.tokens_per_sample,
            "--num-workers",
            "0",
        ],
        args.threads,
    )
    sample = next((h for _, h in sorted(hypotheses(out).items())), [])
    log(
        f"[{name}] {task} sample: ... {' '.join(sample[max(0, p['prefix'] - 4) : p['prefix'] + p['answer']])}  "
        f"(expected ... {' '.join(p['lines'][0][max(0, p['prefix'] - 4) :])})"
    )
    return answer_accuracy(out, p["lines"], p["prefix"], p["answer"])


def run_mechanism(name: str, data: Path, prompts: Dict[str, Dict], args) -> Dict:
    save = args.work_dir / "checkpoints" / name
    common = ["--user-dir", ROOT / "plugins" / "efficient_fairseq", "--cpu"]
    flags = [str(f) for f in args.flags.get(name, MECHANISM_FLAGS.get(name, []))]
    log(f"[{name}] fairseq-train --arch transformer_lm_{name} {' '.join(flags)} ({args.max_update} updates)")
    t0 = time.time()
    train_out, rss = run(
        "fairseq-train",
        [
            data,
            *common,
            "--task",
            "language_modeling",
            "--arch",
            f"transformer_lm_{name}",
            *flags,
            "--decoder-layers",
            args.layers,
            "--decoder-embed-dim",
            args.dim,
            "--decoder-ffn-embed-dim",
            2 * args.dim,
            "--decoder-attention-heads",
            args.heads,
            "--share-decoder-input-output-embed",
            "--dropout",
            "0.0",
            # unscaled token embeddings: fairseq's default sqrt(dim) scaling drowns the position embeddings, and
            # the copy (a fixed 16-token offset) is then learned thousands of updates later, if at all
            "--no-scale-embedding",
            *(["--decoder-learned-pos"] if args.learned_pos else []),
            "--tokens-per-sample",
            args.tokens_per_sample,
            "--sample-break-mode",
            "eos",
            "--batch-size",
            args.batch_size,
            "--required-batch-size-multiple",
            "1",
            "--optimizer",
            "adam",
            "--adam-betas",
            "(0.9, 0.98)",
            "--lr",
            args.lr,
            "--lr-scheduler",
            "inverse_sqrt",
            "--warmup-updates",
            args.warmup,
            "--clip-norm",
            "1.0",
            "--max-update",
            args.max_update,
            "--save-dir",
            save,
            "--no-epoch-checkpoints",
            "--validate-interval",
            10**6,
            "--save-interval",
            10**6,  # validate and save once, at the end
            "--log-format",
            "simple",
            "--log-interval",
            max(1, args.max_update // 5),
            "--seed",
            args.seed,
            "--num-workers",
            "0",
        ],
        args.threads,
        echo=lambda ln: (
            f"    [{name}] " + ln[ln.find("epoch") :].rstrip()
            if "train_inner" in ln
            else ln.rstrip()
            if "Error" in ln
            else None
        ),
    )
    train_time = time.time() - t0
    ckpt = save / "checkpoint_last.pt"
    log(f"[{name}] fairseq-generate (beam 2, incremental decoding): {args.prompts} prompts of {', '.join(prompts)}")
    acc = {t: generate(name, t, p, data, ckpt, common, args) for t, p in prompts.items()}
    return {
        "mechanism": name,
        "flags": " ".join(flags),
        "params": count_params(train_out),
        "ppl": last_metric(train_out, "ppl", "| valid |"),
        "wps": last_metric(train_out, "wps"),
        "rss": rss,
        "acc": acc,
        "time": train_time,
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if math.isfinite(x) else "-"


def table(rows: List[Dict], prompts: Dict[str, Dict]) -> str:
    tasks = list(prompts)
    head = [
        "mechanism",
        *(f"{t} acc" for t in tasks),
        "train time (s)",
        "valid ppl",
        "parameters",
        "train tokens/s",
        "peak memory (MiB)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        name = r["mechanism"] + (f" (`{r['flags']}`)" if r["flags"] else "")
        cells = [
            name,
            *(_pct(r["acc"][t]) for t in tasks),
            f"{r['time']:.0f}",
            f"{r['ppl']:.2f}" if math.isfinite(r["ppl"]) else "-",
            f"{r['params']:,}",
            f"{r['wps']:,.0f}",
            f"{r['rss']:,.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        "| chance (a uniform guess among the line's own candidates) | "
        + " | ".join(_pct(prompts[t]["chance"]) for t in tasks)
        + " | | | | | |"
    )
    return "\n".join(lines)


def summary(rows: List[Dict], prompts: Dict[str, Dict], args) -> str:
    """One line: per task, which mechanisms learned it (accuracy >= LEARNED), which stayed near chance."""
    parts = []
    for task, p in prompts.items():
        learned = [r["mechanism"] for r in rows if r["acc"][task] >= LEARNED]
        near = [r["mechanism"] for r in rows if r["acc"][task] < 2 * p["chance"]]
        partly = [r["mechanism"] for r in rows if r["mechanism"] not in learned + near]
        said = [
            f"learned by {', '.join(learned) or 'none'}",
            *([f"partly by {', '.join(partly)}"] if partly else []),
            *([f"near chance: {', '.join(near)}"] if near else []),
        ]
        parts.append(f"{task}: " + "; ".join(said))
    default_local = " ".join(map(str, MECHANISM_FLAGS["local"]))
    reach = ""
    if any(r["mechanism"] == "local" and r["flags"] == default_local for r in rows):
        reach = (
            f" (local's window reaches {args.layers * LOCAL_WINDOW} tokens back in {args.layers} layers; "
            f"the copy source is {(args.max_len - 1) // 2} back.)"
        )
    return (
        f"What the table shows (learned: >= {LEARNED:.0%}; near chance: < 2x chance): " + ". ".join(parts) + "." + reach
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--mechanisms",
        help="comma-separated registered names (default: %s, first %d registered)"
        % (",".join(DEFAULT_MECHANISMS), DEFAULT_COUNT),
    )
    p.add_argument("--work-dir", type=Path, default=ROOT / "work_dirs" / "fairseq_main")
    p.add_argument("--max-update", type=int, default=400, help="training updates per mechanism")
    p.add_argument("--tokens-per-sample", type=int, default=64, help="longest sample (one line per sample)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--warmup", type=int, default=100, help="warm-up updates (then inverse square root decay)")
    p.add_argument(
        "--learned-pos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="learned position embeddings (fairseq's --decoder-learned-pos)",
    )
    p.add_argument(
        "--task",
        default="copy",
        choices=(*make_corpus.TASKS, *make_corpus.MIXES),
        help="corpus of make_corpus.py (longrange: copy and mqar lines in turn; mqar needs far more updates)",
    )
    p.add_argument("--train-lines", type=int, default=4000)
    p.add_argument("--valid-lines", type=int, default=40)
    p.add_argument("--prompts", type=int, default=32, help="test prompts per task")
    p.add_argument("--min-len", type=int, default=33)
    p.add_argument("--max-len", type=int, default=33, help="longest line; the test prompts have this length")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per fairseq process (OMP_NUM_THREADS): "
        "one is fastest for these small models and avoids OpenMP spin-waits on a busy machine",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="mechanisms trained at the same time (default: 2 where there are two cores)",
    )
    p.add_argument(
        "--flags",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="extra fairseq-train flags for one mechanism, replacing its defaults "
        "(e.g. --flags 'local=--attn-wsize 15'); repeatable",
    )
    args = p.parse_args(argv)
    flags = {}
    for item in args.flags:
        name, sep, rest = item.partition("=")
        if not sep or not name.strip():
            p.error(f"--flags takes NAME=FLAGS, got {item!r}")
        flags[name.strip()] = shlex.split(rest)
    args.flags = flags
    if not 8 <= args.min_len <= args.max_len < args.tokens_per_sample:
        p.error(
            f"need 8 <= --min-len <= --max-len < --tokens-per-sample, got {args.min_len}, {args.max_len}, "
            f"{args.tokens_per_sample}"
        )
    names = choose_mechanisms(args.mechanisms)
    unknown = sorted(set(args.flags) - set(names))
    if unknown:
        p.error(f"--flags for mechanisms that do not run: {', '.join(unknown)} (running: {', '.join(names)})")
    log(
        f"mechanisms: {', '.join(names)}; {args.jobs} at a time, {args.threads} thread(s) each; "
        f"work dir {args.work_dir}"
    )
    t0 = time.time()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    data, prompts = make_data(args.work_dir, args)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda name: run_mechanism(name, data, prompts, args), names))
    result = table(rows, prompts) + "\n\n" + summary(rows, prompts, args)
    (args.work_dir / "results.md").write_text(result + "\n")
    log(f"done in {time.time() - t0:.0f} s; table written to {args.work_dir / 'results.md'}")
    print(result)


if __name__ == "__main__":
    main()
