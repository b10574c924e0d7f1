"""Evaluation: `megatron-spark eval` (math benchmarks plain and with test-time self-reflection, VL-RewardBench,
RewardBench 2, recycled judge tasks) on in-process vLLM or an OpenAI-compatible server, resumable results, and
`megatron-spark score`. See docs/evaluation.md."""
