#!/usr/bin/env python
"""The main job: train fairseq LMs with several mechanisms on long-range tasks, on the CPU.

For each mechanism it runs the real fairseq programs with the plugin:

1. ``fairseq-train`` (``--arch transformer_lm_<name>``) on the synthetic corpus
   of ``make_corpus.py`` (``--task longrange``: copy and associative-recall
   lines, 33 tokens by default, one line per sample), streaming its progress;
2. ``fairseq-eval-lm`` on the validation split (perplexity);
3. ``fairseq-generate`` with beam search (beam 2, the mechanism's incremental
   decoding) completing copy prompts after their ``|`` and recall prompts after
   their ``? key``;

then prints a table: mechanism, parameters, validation perplexity, training
tokens/s, peak memory (max RSS of the training process), copy and recall
accuracy (share of answer tokens generated right).

    python examples/fairseq/main_job.py                       # default mechanisms
    python examples/fairseq/main_job.py --mechanisms vanilla,local --max-update 50

The default list skips names that are not registered (or cannot do causal
self attention); ``--mechanisms`` overrides it.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import make_corpus  # noqa: E402

# preferred order; names that are not registered are skipped
DEFAULT_MECHANISMS = ("vanilla", "local", "performer", "abc", "s4d", "cosformer", "block_sparse", "dilated",
                      "longshort", "landmark", "blockwise")
DEFAULT_COUNT = 3
THREADS = 1  # --threads; one thread avoids OpenMP spin-waiting on small, busy machines
# per-mechanism flags: local's default 15-token blocks reach the copy source 17 tokens back in one
# layer; with 8-token blocks one layer sees the previous 8-15 tokens and two layers must relay it
MECHANISM_FLAGS = {"local": ["--attn-wsize", "8"]}


def log(msg: str) -> None:
    print(f"[main-job {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fairseq_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "plugins"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = str(THREADS)
    env["MKL_NUM_THREADS"] = str(THREADS)
    return env


def program(name: str) -> List[str]:
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", f"import sys; from fairseq_cli.{name.split('-', 1)[1].replace('-', '_')} import cli_main; sys.exit(cli_main())"]


def run(name: str, args: List, echo=None) -> (str, float):
    """Run a fairseq program; returns (its output, peak RSS in MiB). ``echo`` filters lines to show live."""
    cmd = program(name) + [str(a) for a in args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=fairseq_env())
    out = []
    for line in proc.stdout:
        out.append(line)
        if echo is not None and echo(line):
            print("    " + line[line.find("epoch"):].rstrip() if "epoch" in line else line.rstrip(), flush=True)
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
            raise SystemExit(f"not registered or not causal-capable: {', '.join(bad)}; choose from: {', '.join(causal)}")
        return names
    chosen = [n for n in DEFAULT_MECHANISMS if n in causal]
    chosen += [n for n in causal if n not in chosen]  # anything else registered, if the list runs short
    return chosen[:DEFAULT_COUNT]


def prompt_lengths(args) -> Dict[str, int]:
    """Length of the copy and recall prompts (the longest lines), for the tasks the corpus has."""
    tasks = make_corpus.MIXES.get(args.task, (args.task,))
    lengths = {"copy": args.max_len if args.max_len % 2 else args.max_len - 1, "recall": args.max_len}
    return {t: n for t, n in lengths.items() if t in tasks}


def make_data(work: Path, args) -> Path:
    data = work / "data-bin"
    if (data / "dict.txt").exists():
        log(f"reusing preprocessed corpus {data}")
        return data
    raw = work / "raw"
    log(f"generating the synthetic corpus ({args.task}, {args.min_len}-{args.max_len} tokens) in {raw} "
        f"(seed {args.seed})")
    sizes = {"train": args.train_lines, "valid": args.valid_lines, "test": args.valid_lines}
    make_corpus.write_corpus(raw, args.task, "lm", sizes, args.min_len, args.max_len, args.seed)
    rng = random.Random(f"{args.seed}-prompts")
    for task, length in prompt_lengths(args).items():
        examples = [make_corpus.MAKERS[task](rng, length) for _ in range(args.prompts)]
        (raw / f"prompts_{task}.txt").write_text("".join(" ".join(src + tgt) + "\n" for src, tgt in examples))
    log("fairseq-preprocess")
    tests = ",".join(str(raw / f) for f in ("test.txt", *(f"prompts_{t}.txt" for t in prompt_lengths(args))))
    run("fairseq-preprocess", ["--only-source", "--trainpref", raw / "train.txt", "--validpref", raw / "valid.txt",
                               "--testpref", tests, "--destdir", data, "--workers", "1"])
    return data


def count_params(text: str) -> int:
    m = re.search(r"num\. shared model params: ([\d,]+)", text)
    return int(m.group(1).replace(",", "")) if m else -1


def last_metric(text: str, key: str, tag: str = "| train |") -> float:
    vals = [ln for ln in text.splitlines() if tag in ln and f" {key} " in ln]
    if not vals:
        return float("nan")
    m = re.search(rf"\b{key} ([\d.]+)", vals[-1])
    return float(m.group(1)) if m else float("nan")


def hypotheses(text: str) -> Dict[int, List[str]]:
    hyps = {}
    for ln in text.splitlines():
        if ln.startswith("H-"):
            idx, _, toks = ln.split("\t", 2)
            hyps[int(idx[2:])] = toks.split()
    return hyps


def answer_accuracy(text: str, prompts: List[List[str]], prefix: int) -> float:
    """Share of the answer tokens (those after the first ``prefix`` of each prompt) generated right."""
    hyps = hypotheses(text)
    right = total = 0
    for i, prompt in enumerate(prompts):
        target = prompt[prefix:]
        got = hyps.get(i, [])[prefix:]
        right += sum(a == b for a, b in zip(got, target))
        total += len(target)
    return right / max(total, 1)


def generate(name: str, task: str, subset: str, data: Path, work: Path, ckpt: Path, common: List, args) -> float:
    """Beam search completing the ``task`` prompts after their question; the answers' accuracy."""
    prompts = [ln.split() for ln in (work / "raw" / f"prompts_{task}.txt").read_text().splitlines()]
    length = len(prompts[0])
    prefix = length // 2 + 1 if task == "copy" else length - 1  # copy: up to "|"; recall: up to the key
    out, _ = run("fairseq-generate", [
        data, *common, "--task", "language_modeling", "--path", ckpt, "--gen-subset", subset, "--beam", "2",
        "--sample-break-mode", "eos", "--prefix-size", prefix, "--max-len-b", length + 1,
        "--batch-size", len(prompts), "--required-batch-size-multiple", "1", "--tokens-per-sample",
        args.tokens_per_sample, "--num-workers", "0",
    ])
    if task == "copy":
        sample = next((" ".join(h) for i, h in sorted(hypotheses(out).items())), "")
        log(f"[{name}] copy sample: ...{sample[-100:]}")
    return answer_accuracy(out, prompts, prefix)


def run_mechanism(name: str, data: Path, work: Path, args) -> Dict:
    save = work / "checkpoints" / name
    common = ["--user-dir", ROOT / "plugins" / "efficient_fairseq", "--cpu"]
    log(f"[{name}] fairseq-train --arch transformer_lm_{name} ({args.max_update} updates)")
    t0 = time.time()
    train_out, rss = run("fairseq-train", [
        data, *common, "--task", "language_modeling", "--arch", f"transformer_lm_{name}",
        "--decoder-layers", args.layers, "--decoder-embed-dim", args.dim, "--decoder-ffn-embed-dim", 2 * args.dim,
        "--decoder-attention-heads", args.heads, "--share-decoder-input-output-embed", "--dropout", "0.0",
        "--tokens-per-sample", args.tokens_per_sample, "--sample-break-mode", "eos", "--batch-size", args.batch_size,
        *(["--decoder-learned-pos"] if args.learned_pos else []),
        "--required-batch-size-multiple", "1", "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
        "--lr", args.lr, "--lr-scheduler", "inverse_sqrt", "--warmup-updates", 100,
        "--clip-norm", "1.0", "--max-update", args.max_update, "--save-dir", save, "--no-epoch-checkpoints",
        "--log-format", "simple", "--log-interval", max(1, args.max_update // 5), "--seed", args.seed,
        "--num-workers", "0", "--validate-interval-updates", args.max_update, "--disable-validation",
        *MECHANISM_FLAGS.get(name, []),
    ], echo=lambda ln: "train_inner" in ln or "Error" in ln)
    train_time = time.time() - t0
    ckpt = save / "checkpoint_last.pt"
    log(f"[{name}] fairseq-eval-lm (validation split)")
    eval_out, _ = run("fairseq-eval-lm", [
        data, *common, "--path", ckpt, "--gen-subset", "valid", "--tokens-per-sample", args.tokens_per_sample,
        "--sample-break-mode", "eos",  # one line per sample, as trained (positions start at each line)
        "--batch-size", args.batch_size, "--required-batch-size-multiple", "1", "--num-workers", "0",
    ])
    m = re.search(r"Perplexity: ([\d.]+|inf|nan)", eval_out)
    ppl = float(m.group(1)) if m else float("nan")
    tasks = list(prompt_lengths(args))
    log(f"[{name}] fairseq-generate (beam 2, incremental decoding) on {args.prompts} prompts of {', '.join(tasks)}")
    acc = {t: generate(name, t, f"test{i}", data, work, ckpt, common, args) for i, t in enumerate(tasks, 1)}
    copy_acc, recall_acc = acc.get("copy", float("nan")), acc.get("recall", float("nan"))
    return {
        "mechanism": name, "params": count_params(train_out), "ppl": ppl, "wps": last_metric(train_out, "wps"),
        "rss": rss, "copy": copy_acc, "recall": recall_acc, "time": train_time,
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if math.isfinite(x) else "-"


def table(rows: List[Dict]) -> str:
    head = ("| mechanism | parameters | valid ppl | train tokens/s | peak memory (MiB) | copy acc | recall acc "
            "| train time (s) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ppl = f"{r['ppl']:.2f}" if math.isfinite(r["ppl"]) else str(r["ppl"])
        lines.append(f"| {r['mechanism']} | {r['params']:,} | {ppl} | {r['wps']:,.0f} | {r['rss']:,.0f} | "
                     f"{_pct(r['copy'])} | {_pct(r['recall'])} | {r['time']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mechanisms", help="comma-separated registered names (default: %s, first %d registered)"
                   % (",".join(DEFAULT_MECHANISMS), DEFAULT_COUNT))
    p.add_argument("--work-dir", type=Path, default=ROOT / "work_dirs" / "fairseq_main")
    p.add_argument("--max-update", type=int, default=1500,
                   help="training updates (when vanilla learns the copy depends on the seed: see examples/fairseq/README.md)")
    p.add_argument("--tokens-per-sample", type=int, default=128, help="longest line (one line per sample)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--learned-pos", action=argparse.BooleanOptionalAction, default=True,
                   help="learned position embeddings (fairseq's --decoder-learned-pos)")
    p.add_argument("--task", default="copy", choices=(*make_corpus.TASKS, *make_corpus.MIXES),
                   help="corpus of make_corpus.py (longrange: copy and recall lines in turn; it needs more "
                        "updates: vanilla had learned neither after 1,000)")
    p.add_argument("--train-lines", type=int, default=4000)
    p.add_argument("--valid-lines", type=int, default=40)
    p.add_argument("--prompts", type=int, default=16, help="copy prompts and recall prompts to complete")
    p.add_argument("--min-len", type=int, default=33)
    p.add_argument("--max-len", type=int, default=33)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per fairseq process (OMP_NUM_THREADS)")
    args = p.parse_args(argv)
    if not 8 <= args.min_len <= args.max_len < args.tokens_per_sample:
        p.error(f"need 8 <= --min-len <= --max-len < --tokens-per-sample, got {args.min_len}, {args.max_len}, "
                f"{args.tokens_per_sample}")
    global THREADS
    THREADS = args.threads
    names = choose_mechanisms(args.mechanisms)
    log(f"mechanisms: {', '.join(names)}; work dir {args.work_dir}")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    data = make_data(args.work_dir, args)
    rows = []
    for i, name in enumerate(names, 1):
        log(f"=== {i}/{len(names)}: {name} ===")
        rows.append(run_mechanism(name, data, args.work_dir, args))
        print(table(rows), flush=True)
    result = table(rows)
    (args.work_dir / "results.md").write_text(result + "\n")
    log(f"done; table written to {args.work_dir / 'results.md'}")
    print(result)


if __name__ == "__main__":
    main()
