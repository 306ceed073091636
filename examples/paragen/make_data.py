"""Write the synthetic corpora of the ParaGen examples (no download, deterministic).

    python make_data.py [OUT_DIR] [--scale F]   # default: ./data, scale 1.0

* ``OUT_DIR/translation/{train,valid,test}.{src,tgt}``: word-by-word
  "translation": the target maps each source word ``aN`` to ``bN`` and reverses
  every pair of adjacent words (a little reordering the model must attend for).
* ``OUT_DIR/lm/{train,valid}.txt``: each source sentence followed by its
  translation on one line, for masked language modelling (a masked word can be
  recovered from the other half).
* ``OUT_DIR/vocab``: one ``token count`` line per word (ParaGen's
  ``Vocabulary`` tokenizer format), shared by both tasks.
"""

import argparse
import random
from collections import Counter
from pathlib import Path

WORDS = 24
SIZES = {"train": 4000, "valid": 100, "test": 100}


def translate(src):
    tgt = [w.replace("a", "b", 1) for w in src]
    for i in range(0, len(tgt) - 1, 2):
        tgt[i], tgt[i + 1] = tgt[i + 1], tgt[i]
    return tgt


def main(out: Path, scale: float = 1.0) -> None:
    """Write the corpora; ``scale`` multiplies every split's size (tests use a small one)."""
    rng = random.Random(0)
    counts = Counter()
    mt = out / "translation"
    mt.mkdir(parents=True, exist_ok=True)
    for split, n in SIZES.items():
        n = max(1, int(n * scale))
        src_lines, tgt_lines = [], []
        for _ in range(n):
            src = [f"a{rng.randrange(WORDS)}" for _ in range(rng.randint(4, 16))]
            tgt = translate(src)
            counts.update(src + tgt)
            src_lines.append(" ".join(src))
            tgt_lines.append(" ".join(tgt))
        (mt / f"{split}.src").write_text("\n".join(src_lines) + "\n")
        (mt / f"{split}.tgt").write_text("\n".join(tgt_lines) + "\n")
    lm = out / "lm"
    lm.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        src_lines = (mt / f"{split}.src").read_text().splitlines()
        tgt_lines = (mt / f"{split}.tgt").read_text().splitlines()
        (lm / f"{split}.txt").write_text("".join(f"{s} {t}\n" for s, t in zip(src_lines, tgt_lines)))
    (out / "vocab").write_text("".join(f"{w} {c}\n" for w, c in counts.most_common()))
    print(f"wrote {out}/translation, {out}/lm and {out}/vocab ({len(counts)} words)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="data", type=Path)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every split's size")
    args = parser.parse_args()
    main(args.out, args.scale)
