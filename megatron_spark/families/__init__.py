"""The model families, one module each (`qwen.py`: Qwen2 / Qwen2.5, Qwen3, Qwen2.5-VL). Each module defines its
`ModelFamily` objects in a `FAMILIES` tuple; the registry in `models/hf_config.py` loads them."""
