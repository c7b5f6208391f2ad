#!/usr/bin/env bash
# Issue 6's GPU figures in one prepared command, for a session that is lent an accelerator (one H200 here).
#
#   bash tools/gpu_check.sh            # writes $OUT/bench.jsonl, train.log, train_metrics.jsonl, env.txt
#   PYTHON=.venv/bin/python GPU_CHECK_BENCH=mae_tiny GPU_CHECK_TRAIN=mae_pretrain.py:smoke GPU_CHECK_BATCH=2 \
#     GPU_CHECK_PRECISION=float32 GPU_CHECK_ATTENTION=xla GPU_CHECK_DATA=record_tiny,synth_tiny,noise_h5_tiny \
#     GPU_CHECK_DENOISE_BENCH=denoise_tiny GPU_CHECK_DENOISE_BATCH=2 \
#     GPU_CHECK_BUDGET_S=1200 bash tools/gpu_check.sh     # dry run of the script itself on CPU (each bench's 8192^2
#                                                         # matmul peak takes ~3 min on 2 cores)
#
# The device image has jax/jaxlib + the CUDA plugin but not grain / ml_collections / our pinned flax etc.: put those
# pure-Python-or-small wheels in .whl/ beforehand (command in notes/perf.md, "GPU check") and carry `.whl`.
# The runs go in priority order under one deadline (GPU_CHECK_BUDGET_S, default 500 s): each bench prints one JSON
# line; a run that would start with under 60 s left is skipped and says so.
#   1-2  mae_base bf16, conv lowering xla vs the CPU-tuned one (models.layers.resolve_conv_impl), cudnn attention
#   3    the same with the explicit attention (head-major einsums)
#   4    a 40-step real training run of mae_pretrain.py:base: steps_per_s and data_wait_frac (input stalls) per 10
#        steps, from its metrics.jsonl (copied to $OUT/train_metrics.jsonl)
#   5    the host side: record_data (pre-rendered ArrayRecord frame records), synth_data and noise_h5 (denoiser
#        samples from HDF5 cases, noise made in the step) samples/s per worker on the device machine's CPUs
#        (GPU_CHECK_DATA=record_tiny,synth_tiny,noise_h5_tiny for the dry run)
#   6    the denoiser's train step (denoise.py:paper, noise made in the step) at batch GPU_CHECK_DENOISE_BATCH
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
deadline=$(( $(date +%s) + ${GPU_CHECK_BUDGET_S:-500} ))
batch=${GPU_CHECK_BATCH:-32}
py=${PYTHON:-python3}
bench_name=${GPU_CHECK_BENCH:-mae_base}
train_cfg=${GPU_CHECK_TRAIN:-mae_pretrain.py:base}
precision=${GPU_CHECK_PRECISION:-bfloat16}
flash=${GPU_CHECK_ATTENTION:-cudnn}  # the fused attention under test (xla for a CPU dry run)
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$py" -c "import jax, flax, optax, grain; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', \
optax.__version__, 'grain', grain.__version__ if hasattr(grain, '__version__') else '?'); print(jax.devices())" 2>&1
} | tee "$OUT/env.txt"

left() { echo $(( deadline - $(date +%s) )); }

bench() {  # NAME OVERRIDES...
  local name=$1; shift
  if [ "$(left)" -lt 60 ]; then echo "{\"skipped\": \"$name\", \"reason\": \"deadline\"}" | tee -a "$OUT/bench.jsonl"; return; fi
  echo "== $name ($(left) s left)"
  timeout "$(left)" "$py" -m cinema_jax.bench --config=configs/bench.py:"$bench_name" --config.precision="$precision" \
    --config.batch_size="$batch" --config.matmul_size=8192 --config.warmup_steps=2 --config.timed_steps=5 "$@" \
    2>"$OUT/$name.err" | tail -n 1 | tee -a "$OUT/bench.jsonl"
}

bench mae_xla_cudnn --config.conv=xla --config.attention="$flash"
bench mae_tuned_cudnn --config.conv=tuned --config.attention="$flash"
bench mae_xla_explicit --config.conv=xla --config.attention=explicit

if [ "$(left)" -ge 120 ]; then
  echo "== train ($(left) s left)"
  rm -rf /tmp/gpu_check_run
  timeout "$(left)" "$py" -m cinema_jax train --config=configs/"$train_cfg" --workdir=/tmp/gpu_check_run \
    --config.precision="$precision" --config.total_steps=40 --config.log_every=10 --config.batch_size="$batch" --config.remat=none \
    --config.attention="$flash" --config.checkpoint_every=100000 --config.eval_every=100000 \
    --config.image_every=100000 > "$OUT/train.log" 2>&1
  echo "train exit $?"
  cp /tmp/gpu_check_run/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null \
    && grep -o '"step": [0-9]*\|"steps_per_s": [0-9.e-]*\|"data_wait_frac": [0-9.e-]*' "$OUT/train_metrics.jsonl" | paste - - -
else
  echo "train skipped: deadline"
fi

for data_bench in $(echo "${GPU_CHECK_DATA:-record_data,synth_data,noise_h5}" | tr ',' ' '); do
  if [ "$(left)" -lt 60 ]; then echo "{\"skipped\": \"$data_bench\", \"reason\": \"deadline\"}" | tee -a "$OUT/bench.jsonl"; continue; fi
  echo "== $data_bench ($(left) s left)"
  timeout "$(left)" "$py" -m cinema_jax.bench --config=configs/bench.py:"$data_bench" 2>"$OUT/$data_bench.err" \
    | tail -n 1 | tee -a "$OUT/bench.jsonl"
done

bench_name=${GPU_CHECK_DENOISE_BENCH:-denoise}
batch=${GPU_CHECK_DENOISE_BATCH:-16}
bench denoise_xla --config.conv=xla
