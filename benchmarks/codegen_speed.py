"""ffc generated kernels vs transformers eager, same process, same threads (issue 3's table).

    python benchmarks/codegen_speed.py smol.ffc --runs 5 --threads 2
Equivalent to `ffc bench smol.ffc --compare transformers`.
"""
import sys

from ffc.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
