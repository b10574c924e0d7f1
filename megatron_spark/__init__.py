"""megatron-spark: SPARK reinforcement fine-tuning on megatron-core with vLLM rollouts."""
__version__ = "0.1.0"
