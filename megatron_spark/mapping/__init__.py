"""Declarative HF <-> Megatron weight tables (`qwen.py`) and the typed transforms they use (`transforms.py`)."""
