#!/usr/bin/env bash
# The checks only a GPU can run, in one go: the GPU test tier (CUDA logits and policy log-probs vs HF, the
# distributed optimizer; TE spec when Transformer Engine is installed), trainer MFU on real 7B/32B layer shapes,
# and the bridge executor on real 32B shapes (in place and hf_full) against the device's copy bandwidth. Logs go to $OUT (or
# runs/gpu_checks). Each step has its own time limit so one failure does not hide the others.
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
step mfu_7b 120 $py bench/mfu.py --model 7b --layers 8 --seq 2048 --micro-batches 4
step mfu_32b 120 $py bench/mfu.py --model 32b --layers 2 --seq 2048 --micro-batches 4
for target in vllm_tp hf_full; do
  step sync_32b_$target 90 $py bench/sync.py --model 32b --layers 4 --ranks 1 --bucket-mb 512 --repeats 5 \
    --target $target
done
