#!/usr/bin/env bash
# Mixed-precision check of every registered mechanism on a GPU.
#
#   bash examples/fairseq/check_mixed_precision.sh            # uses python3 / $PYTHON
#
# The GPU machine this is meant for has torch but no fairseq and no network, so
# fairseq-fixed (and its pure-python dependencies) cannot be installed there.
# The check therefore runs the fairseq-free part of a `fairseq-train --fp16 /
# --bf16 / --amp` step: every mechanism, in every pattern it supports, inside
# a transformer block trained in float16 (loss scaling + fp32 master weights,
# as FP16Optimizer does), bfloat16, and fp32 under torch.autocast, plus one
# cached decoding step in half precision; losses and gradients must stay
# finite.  Where fairseq *is* importable, it also runs real `fairseq-train
# --fp16` and `--bf16` LM runs for every causal mechanism.
#
# Output: work_dirs/mixed_precision/report.txt (and the exit status).
# Environment: PYTHON (default python3), DEVICE (default cuda), FAIRSEQ_RUNS=0 skips the
# fairseq-train runs; arguments go to mixed_precision_check.py (--seq, --steps, --mechanisms, --modes).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${PYTHON:-python3}"
out="$root/work_dirs/mixed_precision"
mkdir -p "$out"
export PYTHONPATH="$root:$root/plugins${PYTHONPATH:+:$PYTHONPATH}"
{
  echo "# mixed precision check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
} | tee "$out/report.txt"

status=0
"$py" "$root/examples/fairseq/mixed_precision_check.py" --device "${DEVICE:-cuda}" "$@" | tee -a "$out/report.txt" || status=1

if [ "${FAIRSEQ_RUNS:-1}" = 0 ]; then
  echo "# FAIRSEQ_RUNS=0: only the fairseq-free check above ran" | tee -a "$out/report.txt"
elif "$py" -c 'import fairseq' 2>/dev/null; then
  echo "# fairseq available: real fairseq-train --fp16 / --bf16 runs" | tee -a "$out/report.txt"
  data="$out/data"
  if [ ! -f "$data/bin/dict.txt" ]; then
    "$py" "$root/examples/fairseq/make_corpus.py" --out "$data/raw" --min-len 128 --max-len 512 --train 100 --valid 20 --test 20
    "$py" -m fairseq_cli.preprocess --only-source --trainpref "$data/raw/train.txt" --validpref "$data/raw/valid.txt" \
      --testpref "$data/raw/test.txt" --destdir "$data/bin" --workers 1 >/dev/null
  fi
  names=$("$py" -c 'from efficient_attention import Pattern, available_attentions as a; print(" ".join(n for n, i in a().items() if i.capabilities.supports(Pattern.CAUSAL_SELF)))')
  for name in $names; do
    for prec in --fp16 --bf16; do
      log="$out/train_${name}${prec}.log"
      if "$py" -m fairseq_cli.train "$data/bin" --user-dir "$root/plugins/efficient_fairseq" --task language_modeling \
          --arch "transformer_lm_$name" --decoder-layers 2 --decoder-embed-dim 128 --decoder-ffn-embed-dim 256 \
          --decoder-attention-heads 4 --tokens-per-sample 512 --batch-size 8 --optimizer adam --lr 1e-3 \
          --max-update 20 $prec --save-dir "$out/ck_${name}${prec}" --no-save --log-format simple \
          --log-interval 5 >"$log" 2>&1 && ! grep -qE "loss=(nan|inf)|loss (nan|inf)" "$log"; then
        echo "fairseq-train $name $prec: ok ($(grep -oE 'train \| epoch [0-9]+ \| loss [0-9.]+' "$log" | tail -1))" | tee -a "$out/report.txt"
      else
        echo "fairseq-train $name $prec: FAILED (see $log)" | tee -a "$out/report.txt"; status=1
      fi
    done
  done
else
  echo "# fairseq not importable here: only the fairseq-free check above ran" | tee -a "$out/report.txt"
fi
exit $status
