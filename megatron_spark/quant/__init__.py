"""Quantization: FP8 weights for the rollout engine (`fp8`, pure torch, byte-equal to nvidia-modelopt) and quantized
Hugging Face exports through modelopt (`export`). The trainer itself always stays in its own precision."""
