from setuptools import setup

setup(
    name="ffc",
    version="0.1.0",
    description="A compiler for large-language-model inference",
    python_requires=">=3.10",
    # Everything imports under the one namespace `ffc`; no top-level `ir` or `passes`.
    package_dir={"ffc": "compiler", "ffc.ir": "ir", "ffc.passes": "passes", "ffc.runtime": "runtime",
                 "ffc.codegen_templates": "codegen_templates", "ffc.csrc": "csrc"},
    packages=["ffc", "ffc.ir", "ffc.passes", "ffc.plan", "ffc.lower", "ffc.runtime", "ffc.codegen_templates",
              "ffc.csrc"],
    # kernel templates and the C++ executor ship with the package (found next to ffc/ when installed)
    package_data={"ffc.codegen_templates": ["cpu/*.j2", "cuda/*.j2"], "ffc.csrc": ["*.h", "*.cpp", "*.cu"],
                  "ffc": ["profiles/*.json"]},
    install_requires=[
        "torch==2.13.0",  # the CPU build; an unpinned torch pulls gigabytes of CUDA packages
        # the tested version: the frontend plugs into transformers' attention and experts interfaces
        # and traces its model code, which changes between releases (Falcon's attention did in 5.25)
        "transformers==5.25.0",
        "safetensors",
        "tokenizers",
        "gguf",
        "accelerate",
        "jinja2",
        "numpy",
        "ninja",        # builds the generated kernels
        "pybind11",     # the kernel library is a pybind11 extension
        "fastapi",      # `ffc serve`: the OpenAI-compatible HTTP server
        "uvicorn",
        "prometheus-client",  # /metrics
        "httpx",        # the serving benchmark's HTTP client
        "scipy",        # the parallelization search's MILP (HiGHS)
        "rich",         # progress rows of long commands on a terminal
        "matplotlib",   # ffc inspect --strategy --plot, benchmarks/cost_model.py --plot
    ],
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["ffc=ffc.cli:main"]},
)
