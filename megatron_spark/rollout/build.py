"""The one place a training run's rollout engine is built from `rollout.*`: vLLM (default) or transformers."""
from __future__ import annotations

from megatron_spark.config import RolloutConfig
from megatron_spark.dtypes import hf_name as vllm_dtype


def build_engine(ro: RolloutConfig, hf_dir: str, shape, *, dtype: str, seed: int, min_pixels: int,
                 max_pixels: int):
    """This rank's engine (every rank of a rollout-TP group runs one worker of it, colocated)."""
    multimodal = shape.vision is not None
    if ro.backend == "hf":
        from megatron_spark.rollout.hf_engine import HFRolloutEngine

        return HFRolloutEngine(hf_dir, dtype=vllm_dtype(dtype), max_model_len=ro.max_model_len)
    from megatron_spark.rollout.engine import RolloutEngine

    return RolloutEngine(hf_dir, tensor_parallel_size=ro.tensor_parallel_size, dtype=vllm_dtype(dtype),
                         max_model_len=ro.max_model_len, max_num_seqs=ro.max_num_seqs,
                         enforce_eager=ro.enforce_eager,
                         gpu_memory_utilization=ro.gpu_memory_utilization, seed=seed, min_pixels=min_pixels,
                         max_pixels=max_pixels, tied_embeddings=shape.text.tied_embeddings, multimodal=multimodal,
                         sleep_mode=ro.placement == "colocated")  # (an engine on GPUs of its own never sleeps)
