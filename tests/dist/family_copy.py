"""A renamed copy of the Qwen2 family, loaded through MEGATRON_SPARK_FAMILIES by tests/dist/test_family_seam.py:
what adding a family takes (one module with a `FAMILIES` tuple), with a name and an HF architecture nothing else in
the package knows. vLLM knows the model as Qwen2, which the family says."""
from megatron_spark.families.qwen import QwenFamily

FAMILIES = (
    QwenFamily("qwen2_copy", "SparkCopyQwen2ForCausalLM", multimodal=False, megatron_prefix="",
               vllm_architecture="Qwen2ForCausalLM"),
)
