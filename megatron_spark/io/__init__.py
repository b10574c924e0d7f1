"""Low-level model I/O both the trainer and the converters depend on (and which depends on neither): HF safetensors
reading and writing (`safetensors.py`) and the Megatron-LM checkpoint directory layout (`checkpoint_layout.py`)."""
