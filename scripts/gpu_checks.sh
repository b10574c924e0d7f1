#!/usr/bin/env bash
# The checks only a GPU can run, in one go: the GPU test tier (CUDA logits and policy log-probs vs HF, the
# distributed optimizer; TE spec when Transformer Engine is installed), trainer MFU on real 7B/32B layer shapes,
# and the bridge executor on real 32B shapes (in place and hf_full) against the device's copy bandwidth; FP8
# rollouts (the FP8 sync's cost; the sync into a live CUDA vLLM engine where vLLM is installed); with two or more
# GPUs also the data-parallel checks (tests/dist/parity_worker.py under NCCL: updates at TP1 DP2 / TP2 / PP2,
# the same gradient norm and the same update at every layout). Logs go to $OUT (or runs/gpu_checks). Each step has
# its own time limit so one failure does not hide the others.
set -u
out=${OUT:-runs/gpu_checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
py=${PYTHON:-python3}
step() {  # step NAME SECONDS CMD...: run with a limit, keep the whole log, show its end
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "exit $?"
  grep -v -i "warn" "$out/$name.log" | tail -n "${TAIL:-12}"
}
step env 60 bash -c "nvidia-smi -L; $py -c 'import torch, transformers, megatron.core as m; \
print(torch.__version__, torch.version.cuda, transformers.__version__, m.__version__)'"
step tests 180 $py -m pytest -q -p no:cacheprovider -o addopts= tests/gpu -rs
# The whole trainer on one GPU under NCCL, without CUDA vLLM (rollout.backend=hf): KL on (the frozen reference
# model's placement), the non-distributed optimizer, full recompute, a checkpoint; fp32 (the drift check) and bf16
step smoke_build 120 $py -c "
from megatron_spark.fixtures.shapes import make_shapes_task
from megatron_spark.fixtures.tiny import build_qwen2_5_vl
build_qwen2_5_vl('$out/smoke/model', tied=False, min_pixels=3136, max_pixels=3136)
make_shapes_task('$out/smoke/data', 64, seed=0)"
for dtype in fp32 bf16; do
  step smoke_train_$dtype 300 $py -m megatron_spark.cli train --config examples/tiny_cpu.yaml --nproc-per-node 1 \
    model.hf_dir=$out/smoke/model data.train_file=$out/smoke/data/train.json logging.dir=$out/smoke/run_$dtype \
    checkpoint.dir=$out/smoke/ckpt_$dtype checkpoint.save_interval=2 training.max_steps=3 model.dtype=$dtype \
    parallel.tensor_model_parallel_size=1 rollout.tensor_parallel_size=1 rollout.backend=hf \
    model.recompute_activations=full training.use_distributed_optimizer=false algorithm.kl_coef=0.05 \
    algorithm.entropy_coef=0.01 \
    logging.progress_bar=false
  step smoke_check_$dtype 60 $py scripts/check_run.py $out/smoke/run_$dtype --steps 3 \
    --max-drift $([ $dtype = fp32 ] && echo 1e-3 || echo 0.5)
done
step mfu_7b 120 $py bench/mfu.py --model 7b --layers 8 --seq 2048 --micro-batches 4
step mfu_32b 120 $py bench/mfu.py --model 32b --layers 2 --seq 2048 --micro-batches 4
for target in vllm_tp hf_full; do
  step sync_32b_$target 90 $py bench/sync.py --model 32b --layers 4 --ranks 1 --bucket-mb 512 --repeats 5 \
    --target $target
done
# FP8 rollouts: the FP8 sync's cost on real 32B shapes, then the sync into a live CUDA vLLM engine against an engine
# loaded from modelopt's FP8 export (needs CUDA vLLM; without it the same check runs on the stream's bytes)
step sync_32b_fp8 120 $py bench/sync.py --model 32b --layers 4 --ranks 1 --bucket-mb 512 --repeats 5 --quantize fp8
if $py -c 'import vllm' 2>/dev/null; then
  step fp8_rollout 300 $py scripts/fp8_rollout_check.py "$out/fp8_rollout"
else
  echo "=== fp8_rollout: vLLM is not installed here; skipped the live engine (running the byte check instead)"
  step fp8_rollout_dry 120 $py scripts/fp8_rollout_check.py "$out/fp8_rollout" --dry-run
fi
n_gpu=$($py -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "${n_gpu:-0}" -ge 2 ]; then
  step dp2_models 120 $py -c "
import json
from megatron_spark.fixtures.tiny import build_qwen2, build_qwen2_5_vl
d = '$out/dp2_models'
json.dump({'q2_untied_gqa4': str(build_qwen2(d + '/q2', hidden=256, heads=8, kv_heads=2, tied=False, seed=1)),
           'vl_tied': str(build_qwen2_5_vl(d + '/vl', tied=True, seed=2)),
           'q2_3layers': str(build_qwen2(d + '/q3', layers=3, tied=False, seed=5))}, open(d + '.json', 'w'))"
  step dp2 300 $py -m torch.distributed.run --nproc-per-node 2 tests/dist/parity_worker.py "$out/dp2_models.json" \
    "$out/dp2.json"
  # two GPUs: Megatron TP=2 with sequence parallelism, one transformers engine per GPU (the bridge's TP2 -> rTP1
  # sync has ranks sending to each other in one bucket: the NCCL grouping), a checkpoint, resumed for one step
  step smoke_tp2 300 $py -m megatron_spark.cli train --config examples/tiny_cpu.yaml --nproc-per-node 2 \
    model.hf_dir=$out/smoke/model data.train_file=$out/smoke/data/train.json logging.dir=$out/smoke/run_tp2 \
    checkpoint.dir=$out/smoke/ckpt_tp2 checkpoint.save_interval=2 training.max_steps=2 \
    parallel.tensor_model_parallel_size=2 parallel.sequence_parallel=true rollout.tensor_parallel_size=1 \
    rollout.backend=hf training.use_distributed_optimizer=true algorithm.entropy_coef=0.01 logging.progress_bar=false
  step smoke_tp2_resume 300 $py -m megatron_spark.cli train --config examples/tiny_cpu.yaml --nproc-per-node 2 \
    model.hf_dir=$out/smoke/model data.train_file=$out/smoke/data/train.json logging.dir=$out/smoke/run_tp2 \
    checkpoint.dir=$out/smoke/ckpt_tp2 training.max_steps=3 parallel.tensor_model_parallel_size=2 \
    parallel.sequence_parallel=true rollout.tensor_parallel_size=1 rollout.backend=hf algorithm.entropy_coef=0.01 \
    logging.progress_bar=false
  step smoke_tp2_check 60 $py scripts/check_run.py $out/smoke/run_tp2 --steps 3 --max-drift 1e-3
else
  echo "=== dp2: skipped ($n_gpu GPU: data parallelism needs two)"
fi
