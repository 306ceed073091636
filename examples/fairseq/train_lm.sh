#!/usr/bin/env bash
# Train, evaluate and sample a language model with one mechanism on the synthetic long-range corpus.
#
#   bash examples/fairseq/train_lm.sh [MECHANISM] [extra fairseq-train flags...]
#   bash examples/fairseq/train_lm.sh vanilla --attn-num-kv-heads 2
#
# Environment: PYTHON (default: .venv/bin/python or python3), WORK (default work_dirs/fairseq_lm),
# MAX_UPDATE (default 200).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${PYTHON:-$([ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3)}"
bin="$(dirname "$py")"
mech="${1:-vanilla}"; shift || true
work="${WORK:-$root/work_dirs/fairseq_lm}"
export PYTHONPATH="$root:$root/plugins${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # small models: one thread is fastest on a busy CPU
user_dir="$root/plugins/efficient_fairseq"

# lines of at most 448 tokens: a test line plus the 64 generated tokens fit the 512 positions the model
# is trained with, so fairseq-generate decodes every test line (it would skip longer ones)
if [ ! -f "$work/data-bin/dict.txt" ]; then
  "$py" "$root/examples/fairseq/make_corpus.py" --out "$work/raw" --task mixed --min-len 128 --max-len 448 --seed 1
  "$bin/fairseq-preprocess" --only-source --trainpref "$work/raw/train.txt" --validpref "$work/raw/valid.txt" \
    --testpref "$work/raw/test.txt" --destdir "$work/data-bin" --workers 2
fi

"$bin/fairseq-train" "$work/data-bin" --user-dir "$user_dir" --cpu \
  --task language_modeling --arch "transformer_lm_$mech" \
  --decoder-layers 2 --decoder-embed-dim 64 --decoder-ffn-embed-dim 128 --decoder-attention-heads 4 \
  --share-decoder-input-output-embed --dropout 0.0 \
  --tokens-per-sample 512 --sample-break-mode none --batch-size 4 --required-batch-size-multiple 1 \
  --optimizer adam --adam-betas '(0.9, 0.98)' --lr 2e-3 --lr-scheduler inverse_sqrt --warmup-updates 20 \
  --clip-norm 1.0 --max-update "${MAX_UPDATE:-200}" --save-dir "$work/checkpoints/$mech" --no-epoch-checkpoints \
  --log-format simple --log-interval 20 "$@"

"$bin/fairseq-eval-lm" "$work/data-bin" --user-dir "$user_dir" --cpu \
  --path "$work/checkpoints/$mech/checkpoint_last.pt" --gen-subset test \
  --tokens-per-sample 512 --batch-size 4 --required-batch-size-multiple 1

"$bin/fairseq-generate" "$work/data-bin" --user-dir "$user_dir" --cpu \
  --task language_modeling --path "$work/checkpoints/$mech/checkpoint_last.pt" --gen-subset test \
  --sample-break-mode eos --tokens-per-sample 512 --prefix-size 32 --max-len-b 64 \
  --beam 2 --batch-size 2 --required-batch-size-multiple 1 \
  --results-path "$work/generate/$mech"
grep -E '^(S|H)-' "$work/generate/$mech/generate-test.txt" | sed -n 1,4p | cut -c1-300
