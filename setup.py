from setuptools import setup

setup(
    name="ffc",
    version="0.1.0",
    description="A compiler for large-language-model inference",
    python_requires=">=3.10",
    # Everything imports under the one namespace `ffc`; no top-level `ir` or `passes`.
    package_dir={"ffc": "compiler", "ffc.ir": "ir", "ffc.passes": "passes", "ffc.runtime": "runtime"},
    packages=["ffc", "ffc.ir", "ffc.passes", "ffc.runtime"],
    install_requires=[
        "torch==2.13.0",  # the CPU build; an unpinned torch pulls gigabytes of CUDA packages
        "transformers>=5.0,<6",
        "safetensors",
        "tokenizers",
        "gguf",
        "accelerate",
        "jinja2",
        "numpy",
    ],
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["ffc=ffc.cli:main"]},
)
