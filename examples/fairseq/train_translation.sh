#!/usr/bin/env bash
# Train a translation model on the copy task (source: random symbols and "|", target: the same
# symbols) and decode with beam search; fairseq-generate prints the BLEU of the test split.
#
#   bash examples/fairseq/train_translation.sh [ENCODER] [DECODER] [CROSS] [extra fairseq-train flags...]
#   bash examples/fairseq/train_translation.sh vanilla vanilla vanilla --cross-attn-num-kv-heads 1
#
# Environment: PYTHON, WORK (default work_dirs/fairseq_mt), MAX_UPDATE (default 400), TRAIN_LINES
# (default 3000).  Other tasks: make_corpus.py --format translation --task recall|listops|mixed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${PYTHON:-$([ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3)}"
bin="$(dirname "$py")"
enc="${1:-vanilla}"; dec="${2:-$enc}"; cross="${3:-vanilla}"; shift $(( $# < 3 ? $# : 3 )) || true
work="${WORK:-$root/work_dirs/fairseq_mt}"
export PYTHONPATH="$root:$root/plugins${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # small models: one thread is fastest on a busy CPU
user_dir="$root/plugins/efficient_fairseq"

if [ ! -f "$work/data-bin/dict.src.txt" ]; then
  # copy: the target is the source's symbols, so BLEU measures how well the cross attention aligns
  "$py" "$root/examples/fairseq/make_corpus.py" --out "$work/raw" --format translation --task copy \
    --min-len 16 --max-len 64 --train "${TRAIN_LINES:-3000}" --seed 1
  "$bin/fairseq-preprocess" --source-lang src --target-lang tgt --trainpref "$work/raw/train" \
    --validpref "$work/raw/valid" --testpref "$work/raw/test" --destdir "$work/data-bin" --joined-dictionary --workers 2
fi

save="$work/checkpoints/${enc}_${dec}_${cross}"
"$bin/fairseq-train" "$work/data-bin" --user-dir "$user_dir" --cpu --task translation \
  --arch efficient_transformer --encoder-attention "$enc" --decoder-attention "$dec" --cross-attention "$cross" \
  --encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 64 --decoder-embed-dim 64 \
  --encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128 --encoder-attention-heads 4 --decoder-attention-heads 4 \
  --share-all-embeddings --dropout 0.0 --max-source-positions 128 --max-target-positions 128 \
  --max-tokens 4096 --required-batch-size-multiple 1 --optimizer adam --adam-betas '(0.9, 0.98)' --lr 2e-3 \
  --lr-scheduler inverse_sqrt --warmup-updates 50 --clip-norm 1.0 --max-update "${MAX_UPDATE:-400}" \
  --save-dir "$save" --no-epoch-checkpoints --log-format simple --log-interval 20 "$@"

"$bin/fairseq-generate" "$work/data-bin" --user-dir "$user_dir" --cpu --path "$save/checkpoint_last.pt" \
  --gen-subset test --beam 2 --max-tokens 8192 --required-batch-size-multiple 1 --max-len-a 1 --max-len-b 8 \
  | tail -3

# a source of the lengths it was trained on (7-31 symbols); the hypothesis should repeat the symbols
echo "s5 s17 s3 s40 s22 s9 s31 s8 s60 s12 s1 s44 |" | "$bin/fairseq-interactive" "$work/data-bin" --user-dir "$user_dir" --cpu \
  --path "$save/checkpoint_last.pt" --source-lang src --target-lang tgt --beam 2 | grep -E '^(S|H)-'
