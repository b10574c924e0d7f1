#!/usr/bin/env bash
# The checks only a GPU can run, as one prepared checklist for one GPU with CUDA torch (no Transformer Engine, CUDA
# vLLM or flash-attn needed; each is used where installed), in under 9 minutes, ending with one summary table:
#   env      what is installed (megatron-spark doctor: torch's CUDA, TE's core, vLLM, flash-attn, modelopt)
#   tests    the GPU test tier: CUDA logits and log-probs vs HF, the distributed optimizer, the TE spec where it imports
#   smoke    the whole trainer on one GPU under NCCL without vLLM (rollout.backend=hf): fp32 (the drift check), then
#            bf16 with an async checkpoint and a resume; the peak memory each reached
#   convert  hf-to-megatron and `convert verify` on the smoke model: the converters build off the GPU and compare
#            logits across devices
#   mfu      trainer MFU on real 32B layer shapes at 8k tokens with 16 micro-batches (one on the device at a time)
#   sync     the bridge executor on real 32B shapes, in place and FP8, against the device's copy bandwidth
#   fp8/vllm the sync into a live CUDA vLLM engine (FP8 export check; sleep/wake) where vLLM is installed
# With two or more GPUs also the data-parallel checks (tests/dist/parity_worker.py under NCCL) and TP=2 + resume.
# Every step has its own limit and the whole run a deadline (GPU_CHECKS_BUDGET seconds, default 520): a step that
# would not fit in what is left is skipped, and says so. Logs go to $OUT (or runs/gpu_checks).
# `--dry-run`: what can be checked without a GPU (the smoke fixtures are built, each command's script and flags
# resolve, each training config validates), the rest listed; CI runs it (tests/unit/test_entry_points.py), and
# runs the CPU step smoke_build for real (GPU_CHECKS_ONLY="smoke_build": only the steps named).
set -u
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
out=${OUT:-runs/gpu_checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
py=${PYTHON:-python3}
budget=${GPU_CHECKS_BUDGET:-520}
start=$(date +%s)
summary="$out/summary.tsv"
: >"$summary"

# step NAME SECONDS FIGURE_REGEX CMD...: run with a limit, keep the whole log, record exit and the figure it printed
step() {
  local name=$1 limit=$2 figure=$3; shift 3
  local left=$((budget - ($(date +%s) - start)))
  echo "=== $name ($(date +%T), limit ${limit}s, ${left}s left)"
  if [ "$dry" = 1 ]; then
    printf '%s\tplanned\t%s\n' "$name" "$(echo "$*" | tr '\n' ' ')" | cut -c1-160 >>"$summary"
    return 0
  fi
  if [ -n "${GPU_CHECKS_ONLY:-}" ] && ! [[ " $GPU_CHECKS_ONLY " == *" $name "* ]]; then
    return 0  # (GPU_CHECKS_ONLY="step ...": run only those; CI runs smoke_build so)
  fi
  if [ "$limit" -gt "$left" ]; then
    printf '%s\tskipped\tnot enough time left (%ss of %ss)\n' "$name" "$left" "$limit" >>"$summary"
    return 0
  fi
  # (through bash -c: `timeout` runs programs, and a step may be one of the shell functions below)
  timeout "$limit" bash -c '"$@"' _ "$@" >"$out/$name.log" 2>&1
  local rc=$?
  grep -v -i "warn" "$out/$name.log" | tail -n "${TAIL:-8}"
  local fig=""
  [ -n "$figure" ] && fig=$(grep -E -o "$figure" "$out/$name.log" | tail -n 1)
  local result=ok
  [ $rc = 124 ] && result=timeout
  [ $rc != 0 ] && [ $rc != 124 ] && result="failed ($rc)"
  printf '%s\t%s\t%s\n' "$name" "$result" "$fig" >>"$summary"
}

# what runs even in a dry run: the fixtures of the smoke lane (CPU work) and the checks of every command
smoke_fixtures() {
  $py -c "
from megatron_spark.fixtures.shapes import make_shapes_task
from megatron_spark.fixtures.tiny import build_qwen2_5_vl
build_qwen2_5_vl('$out/smoke/model', tied=False, min_pixels=3136, max_pixels=3136)
make_shapes_task('$out/smoke/data', 64, seed=0)"
}
smoke_train() {  # smoke_train DTYPE RUN_NAME EXTRA_OVERRIDES...
  local dtype=$1 name=$2; shift 2
  $py -m megatron_spark.cli train --config examples/tiny_cpu.yaml --nproc-per-node 1 \
    model.hf_dir=$out/smoke/model data.train_file=$out/smoke/data/train.json logging.dir=$out/smoke/run_$name \
    checkpoint.dir=$out/smoke/ckpt_$name checkpoint.save_interval=2 model.dtype=$dtype \
    parallel.tensor_model_parallel_size=1 rollout.tensor_parallel_size=1 rollout.backend=hf \
    model.recompute_activations=full training.use_distributed_optimizer=false algorithm.kl_coef=0.05 \
    algorithm.entropy_coef=0.01 logging.progress_bar=false "$@"
}

export -f smoke_fixtures smoke_train
export out py
if [ "$dry" = 1 ]; then
  smoke_fixtures >"$out/smoke_build.log" 2>&1 || { echo "dry run: the smoke fixtures failed"; cat "$out/smoke_build.log"; exit 1; }
  printf 'smoke_build\tok\tfixtures built on the CPU\n' >>"$summary"
fi
step env 60 "ready|NOT ready" $py -m megatron_spark.cli doctor
step tests 150 "[0-9]+ passed" $py -m pytest -q -p no:cacheprovider -o addopts= tests/gpu -rs
step smoke_build 60 "" smoke_fixtures
step smoke_fp32 100 "" smoke_train fp32 fp32 training.max_steps=3
step smoke_fp32_check 30 "drift [^,]*|max_allocated[^,]*" $py scripts/check_run.py $out/smoke/run_fp32 --steps 3 \
  --max-drift 1e-3
step smoke_bf16 100 "" smoke_train bf16 bf16 training.max_steps=2 checkpoint.async_save=true
step smoke_bf16_resume 80 "resumed from [^ ]*" smoke_train bf16 bf16 training.max_steps=3
step smoke_bf16_check 30 "drift [^,]*|max_allocated[^,]*" $py scripts/check_run.py $out/smoke/run_bf16 --steps 3 \
  --max-drift 0.5
step convert 60 "" $py -m megatron_spark.cli convert hf-to-megatron --hf-dir $out/smoke/model \
  --out $out/smoke/converted --dtype fp32 --force
step convert_verify 60 "max[^|]*" $py -m megatron_spark.cli convert verify --hf-dir $out/smoke/model \
  --ckpt $out/smoke/converted --tp 1 --pp 1
step mfu_32b_8k 90 "MFU [0-9.]+ ?%?|mfu[^,]*" $py bench/mfu.py --model 32b --layers 2 --seq 8192 --micro-batches 16
step sync_32b_vllm_tp 60 "GB/s[^,]*|[0-9.]+ GB/s" $py bench/sync.py --model 32b --layers 4 --ranks 1 \
  --bucket-mb 512 --repeats 5 --target vllm_tp
step sync_32b_fp8 60 "GB/s[^,]*|[0-9.]+ GB/s" $py bench/sync.py --model 32b --layers 4 --ranks 1 --bucket-mb 512 \
  --repeats 5 --quantize fp8
if [ "$dry" = 0 ] && $py -c 'import vllm' 2>/dev/null; then
  step fp8_rollout 150 "" $py scripts/fp8_rollout_check.py "$out/fp8_rollout"
else
  step fp8_rollout_dry 60 "" $py scripts/fp8_rollout_check.py "$out/fp8_rollout" --dry-run
fi
n_gpu=$($py -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "${n_gpu:-0}" -ge 2 ] || [ "$dry" = 1 ]; then
  step dp2_models 60 "" $py -c "
import json
from megatron_spark.fixtures.tiny import build_qwen2, build_qwen2_5_vl
d = '$out/dp2_models'
json.dump({'q2_untied_gqa4': str(build_qwen2(d + '/q2', hidden=256, heads=8, kv_heads=2, tied=False, seed=1)),
           'vl_tied': str(build_qwen2_5_vl(d + '/vl', tied=True, seed=2)),
           'q2_3layers': str(build_qwen2(d + '/q3', layers=3, tied=False, seed=5))}, open(d + '.json', 'w'))"
  step dp2 300 "" $py -m torch.distributed.run --nproc-per-node 2 tests/dist/parity_worker.py \
    "$out/dp2_models.json" "$out/dp2.json"
  # two GPUs: Megatron TP=2 with sequence parallelism, one transformers engine per GPU (the bridge's TP2 -> rTP1
  # sync has ranks sending to each other in one bucket: the NCCL grouping), a checkpoint, resumed for one step
  for steps in 2 3; do
    step smoke_tp2_$steps 200 "" $py -m megatron_spark.cli train --config examples/tiny_cpu.yaml --nproc-per-node 2 \
      model.hf_dir=$out/smoke/model data.train_file=$out/smoke/data/train.json logging.dir=$out/smoke/run_tp2 \
      checkpoint.dir=$out/smoke/ckpt_tp2 checkpoint.save_interval=2 training.max_steps=$steps \
      parallel.tensor_model_parallel_size=2 parallel.sequence_parallel=true rollout.tensor_parallel_size=1 \
      rollout.backend=hf training.use_distributed_optimizer=true algorithm.entropy_coef=0.01 logging.progress_bar=false
  done
  step smoke_tp2_check 30 "drift [^,]*" $py scripts/check_run.py $out/smoke/run_tp2 --steps 3 --max-drift 1e-3
fi

echo
echo "| step | result | figure |"
echo "|---|---|---|"
awk -F'\t' '{printf "| %s | %s | %s |\n", $1, $2, $3}' "$summary"
echo "total $(( $(date +%s) - start )) s (budget ${budget} s); logs in $out"
