"""The synthetic long-range corpus of examples/fairseq/make_corpus.py (no fairseq needed)."""

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "fairseq"))
import make_corpus  # noqa: E402


def test_deterministic_per_seed(tmp_path):
    sizes = {"train": 20, "valid": 3, "test": 3}
    for out, seed in ((tmp_path / "a", 1), (tmp_path / "b", 1), (tmp_path / "c", 2)):
        make_corpus.write_corpus(out, "mixed", "lm", sizes, 100, 600, seed)
    assert (tmp_path / "a/train.txt").read_text() == (tmp_path / "b/train.txt").read_text()
    assert (tmp_path / "a/train.txt").read_text() != (tmp_path / "c/train.txt").read_text()


@pytest.mark.parametrize("task", make_corpus.TASKS)
def test_lengths_and_answers(task):
    rng = random.Random(0)
    for length in (200, 1000, 3000):
        src, tgt = make_corpus.MAKERS[task](rng, length)
        assert 0.8 * length <= len(src) + len(tgt) <= length + 8
        if task == "copy":
            assert src[-1] == "|" and src[:-1] == tgt
        elif task == "recall":
            key = src[-1]
            bound = [src[i + 1] for i in range(0, len(src) - 2, 2) if src[i] == key]
            assert tgt == [bound[-1]]
        elif task == "mqar":
            question = src.index("?")
            table = {}
            for i in range(0, question, 2):
                table[src[i]] = src[i + 1]  # the latest binding counts
            asked = src[question + 1 :] + tgt
            assert len(asked) % 2 == 0 and all(table[k] == v for k, v in zip(asked[::2], asked[1::2]))


def test_listops_values():
    assert make_corpus._listops_value("MED", [3, 1, 2]) == 2
    assert make_corpus._listops_value("SM", [7, 5]) == 2
    rng = random.Random(1)
    src, tgt = make_corpus.listops_example(rng, 500)

    def evaluate(tokens, i):  # recursive descent over "[OP args ]"
        op, i, args = tokens[i][1:], i + 1, []
        while tokens[i] != "]":
            if tokens[i].startswith("["):
                val, i = evaluate(tokens, i)
            else:
                val, i = int(tokens[i]), i + 1
            args.append(val)
        return make_corpus._listops_value(op, args), i + 1

    assert src[-1] == "=" and [str(evaluate(src[:-1], 0)[0])] == tgt
