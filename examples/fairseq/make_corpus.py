#!/usr/bin/env python
"""Synthetic long-range corpora for fairseq, deterministic given ``--seed``.

Three tasks whose answers depend on tokens far back in the sequence:

* ``copy``: ``<random symbols> | <the same symbols>``; the second half is
  predictable only by looking back ``L/2`` tokens.  The symbols are distinct
  while the alphabet (64) allows it, so each copied token has one source.
* ``recall`` (associative recall): ``k1 v1 k2 v2 ... kn vn ? ki vi``; the last
  value is predictable only by finding its key, anywhere earlier.  Keys are
  distinct up to 64 pairs; beyond, a repeated key is rebound (the latest counts).
* ``mqar`` (multi-query associative recall, as in Zoology): ``k1 v1 ... kn vn
  ? ka va kb vb ...``; several distinct keys are queried after the ``?``, each
  answered by its value (a third of the line is queries and answers, so the
  recall signal is dense).  Keys are distinct up to 64 pairs.
* ``listops``: ListOps-style nested expressions ``[MAX 3 [MIN 4 1 ] 9 ] = 9``
  (operators MAX, MIN, MED, SM = sum mod 10) with the answer after ``=``.

Lengths are drawn uniformly in ``[--min-len, --max-len]`` tokens (hundreds to
a few thousand).  ``--format lm`` writes ``{train,valid,test}.txt`` (one
sequence per line); ``--format translation`` writes
``{split}.src`` / ``{split}.tgt`` (the sequence without its answer part / the
answer: the copied half, the recalled value, the ListOps result).

    python examples/fairseq/make_corpus.py --task mixed --out /tmp/lr --seed 1
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import List, Tuple

SYMBOLS = [f"s{i}" for i in range(64)]
KEYS = [f"k{i}" for i in range(64)]
VALUES = [f"v{i}" for i in range(64)]
OPS = ["MAX", "MIN", "MED", "SM"]
TASKS = ("copy", "recall", "mqar", "listops")
# --task names that cycle over several tasks
MIXES = {"mixed": ("copy", "recall", "listops"), "longrange": ("copy", "mqar")}


def _draw(rng: random.Random, pool: List[str], count: int) -> List[str]:
    """``count`` tokens of ``pool``: all distinct while the pool allows it, then with repeats."""
    if count <= len(pool):
        return rng.sample(pool, count)
    return [rng.choice(pool) for _ in range(count)]


def copy_example(rng: random.Random, length: int) -> Tuple[List[str], List[str]]:
    half = max(1, (length - 1) // 2)
    seq = _draw(rng, SYMBOLS, half)
    return seq + ["|"], list(seq)


def recall_example(rng: random.Random, length: int) -> Tuple[List[str], List[str]]:
    pairs = max(1, (length - 3) // 2)
    keys = _draw(rng, KEYS, pairs)
    table = {}
    body: List[str] = []
    for k in keys:
        table[k] = rng.choice(VALUES)  # a repeated key is rebound: the latest binding counts
        body += [k, table[k]]
    query = rng.choice(keys)
    return body + ["?", query], [table[query]]


def mqar_example(rng: random.Random, length: int) -> Tuple[List[str], List[str]]:
    """``n`` pairs, ``?``, then ``m`` queried keys each followed by its value; 2n + 1 + 2m ~ length, m ~ n / 2.

    The source is the line up to the first queried key, the target the rest (its value, the further queries)."""
    pairs = max(1, (length - 1) // 3)
    queries = max(1, min(pairs, (length - 1 - 2 * pairs) // 2))
    keys = _draw(rng, KEYS, pairs)
    table = {}
    body: List[str] = []
    for k in keys:
        table[k] = rng.choice(VALUES)
        body += [k, table[k]]
    asked = _draw(rng, list(table), queries)  # distinct while the keys allow it
    answers: List[str] = []
    for k in asked:
        answers += [k, table[k]]
    return body + ["?", answers[0]], answers[1:]


def _listops_value(op: str, args: List[int]) -> int:
    if op == "MAX":
        return max(args)
    if op == "MIN":
        return min(args)
    if op == "MED":
        return sorted(args)[len(args) // 2]
    return sum(args) % 10


def _listops_tree(rng: random.Random, budget: int, depth: int) -> Tuple[List[str], int]:
    """A random expression of about ``budget`` tokens and its value."""
    op = rng.choice(OPS)
    tokens, args = ["[" + op], []
    remaining = budget - 2
    while remaining > 0 or not args:
        if depth < 8 and remaining > 6 and rng.random() < 0.25:
            sub_budget = rng.randint(4, max(4, min(remaining, budget // 2)))
            sub, val = _listops_tree(rng, sub_budget, depth + 1)
        else:
            val = rng.randint(0, 9)
            sub = [str(val)]
        tokens += sub
        args.append(val)
        remaining -= len(sub)
    return tokens + ["]"], _listops_value(op, args)


def listops_example(rng: random.Random, length: int) -> Tuple[List[str], List[str]]:
    tokens, value = _listops_tree(rng, max(4, length - 2), 0)
    return tokens + ["="], [str(value)]


MAKERS = {"copy": copy_example, "recall": recall_example, "mqar": mqar_example, "listops": listops_example}


def make_split(rng: random.Random, task: str, count: int, min_len: int, max_len: int):
    for i in range(count):
        name = MIXES[task][i % len(MIXES[task])] if task in MIXES else task
        yield MAKERS[name](rng, rng.randint(min_len, max_len))


def write_corpus(out: Path, task: str, fmt: str, sizes, min_len: int, max_len: int, seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, count in sizes.items():
        rng = random.Random(f"{seed}-{task}-{split}")  # each split deterministic on its own
        examples = list(make_split(rng, task, count, min_len, max_len))
        if fmt == "lm":
            (out / f"{split}.txt").write_text("".join(" ".join(src + tgt) + "\n" for src, tgt in examples))
        else:
            (out / f"{split}.src").write_text("".join(" ".join(src) + "\n" for src, _ in examples))
            (out / f"{split}.tgt").write_text("".join(" ".join(tgt) + "\n" for _, tgt in examples))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument(
        "--task",
        choices=(*TASKS, *MIXES),
        default="mixed",
        help="one task, 'mixed' (copy, recall, listops in turn) or 'longrange' (copy and mqar in turn)",
    )
    p.add_argument("--format", choices=("lm", "translation"), default="lm")
    p.add_argument("--min-len", type=int, default=128, help="shortest sequence, in tokens")
    p.add_argument("--max-len", type=int, default=1024, help="longest sequence, in tokens")
    p.add_argument("--train", type=int, default=300, help="training sequences")
    p.add_argument("--valid", type=int, default=30)
    p.add_argument("--test", type=int, default=30)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if not 4 <= args.min_len <= args.max_len:
        p.error(f"need 4 <= --min-len <= --max-len, got {args.min_len}, {args.max_len}")
    sizes = {"train": args.train, "valid": args.valid, "test": args.test}
    write_corpus(args.out, args.task, args.format, sizes, args.min_len, args.max_len, args.seed)


if __name__ == "__main__":
    main()
