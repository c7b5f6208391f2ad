#!/usr/bin/env bash
# Issue 6's GPU figures in one prepared command, for a session that is lent an accelerator (one H200 here).
#
#   bash tools/gpu_check.sh            # writes $OUT/bench.jsonl, $OUT/train.log, $OUT/env.txt
#
# The device image has jax/jaxlib + the CUDA plugin but not grain / ml_collections / our pinned flax etc.: put those
# pure-Python-or-small wheels in .whl/ beforehand (command in notes/perf.md, "GPU check") and carry `.whl`.
# The runs go in priority order under one deadline (GPU_CHECK_BUDGET_S, default 500 s): each bench prints one JSON
# line; a run that would start with under 60 s left is skipped and says so.
#   1-2  mae_base bf16, conv lowering xla vs the CPU-tuned one (models.layers.resolve_conv_impl), cudnn attention
#   3    the same with the explicit attention (head-major einsums)
#   4    a short real training run of mae_pretrain.py:base: step time and data_wait_frac (input stalls) from the log
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
deadline=$(( $(date +%s) + ${GPU_CHECK_BUDGET_S:-500} ))
batch=${GPU_CHECK_BATCH:-32}
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  python3 -c "import jax, flax, optax, grain; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', \
optax.__version__, 'grain', grain.__version__ if hasattr(grain, '__version__') else '?'); print(jax.devices())" 2>&1
} | tee "$OUT/env.txt"

left() { echo $(( deadline - $(date +%s) )); }

bench() {  # NAME OVERRIDES...
  local name=$1; shift
  if [ "$(left)" -lt 60 ]; then echo "{\"skipped\": \"$name\", \"reason\": \"deadline\"}" | tee -a "$OUT/bench.jsonl"; return; fi
  echo "== $name ($(left) s left)"
  timeout "$(left)" python3 -m cinema_jax.bench --config=configs/bench.py:mae_base --config.precision=bfloat16 \
    --config.batch_size="$batch" --config.matmul_size=8192 --config.warmup_steps=2 --config.timed_steps=5 "$@" \
    2>"$OUT/$name.err" | tail -n 1 | tee -a "$OUT/bench.jsonl"
}

bench mae_xla_cudnn --config.conv=xla --config.attention=cudnn
bench mae_tuned_cudnn --config.conv=tuned --config.attention=cudnn
bench mae_xla_explicit --config.conv=xla --config.attention=explicit

if [ "$(left)" -ge 120 ]; then
  echo "== train ($(left) s left)"
  timeout "$(left)" python3 -m cinema_jax train --config=configs/mae_pretrain.py:base --workdir=/tmp/gpu_check_run \
    --config.total_steps=40 --config.log_every=10 --config.batch_size="$batch" --config.remat=none \
    --config.attention=cudnn --config.checkpoint_every=100000 --config.eval_every=100000 \
    --config.image_every=100000 > "$OUT/train.log" 2>&1
  echo "train exit $?"; grep -i "data_wait\|step_time\|steps_per" "$OUT/train.log" | tail -n 5
else
  echo "train skipped: deadline"
fi
