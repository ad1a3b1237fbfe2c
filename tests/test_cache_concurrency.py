"""Processes sharing one FFC_CACHE_DIR: concurrent compiles of the same model each get a whole
kernel library (published atomically, one build per content key) and a working artifact."""
import os
import re
import subprocess
import sys

import ffc
from conftest import tiny_model_folder


def test_four_concurrent_compiles_share_one_cache(tmp_path, smol_source):
    folder = tiny_model_folder(tmp_path / "llama", "llama", smol_source)
    cache = tmp_path / "cache"          # empty: every compile misses, one builds, the others wait
    env = dict(os.environ, FFC_CACHE_DIR=str(cache))
    procs = [subprocess.Popen([sys.executable, "-m", "ffc.cli", "compile", str(folder), "-o", str(tmp_path / f"a{k}.ffc"),
                               "--max-seq-len", "32", "--profile", "a100-nvlink"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in range(4)]
    results = [(p.wait(600), p.stderr.read()) for p in procs]
    for rc, err in results:
        assert rc == 0, err[-3000:]
    logs = "\n".join(err for _, err in results)
    assert logs.count("kernels: compiled ") == 1 and logs.count("kernels: cached build") == 3, logs[-3000:]
    # not a terminal: plain lines, no progress redrawn (no carriage returns or escape codes), and
    # each compile's closing table of phases, the cache hits noted
    assert not {c for c in logs if ord(c) < 32 and c != "\n"}, sorted({c for c in logs if ord(c) < 32})
    rows = re.findall(r"^lower and build kernels +[0-9.]+ +(.*)$", logs, re.M)      # the tables' kernel rows
    assert logs.count("compile total") == 4 and sorted(rows).count("kernel library from the cache") == 3, rows
    quiet = subprocess.run([sys.executable, "-m", "ffc.cli", "compile", str(folder), "-o", str(tmp_path / "q.ffc"),
                            "--max-seq-len", "32", "--profile", "a100-nvlink", "--quiet"], env=env,
                           capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout.strip() == str(tmp_path / "q.ffc")
    libs = list((cache / "kernels").glob("*/ffc_kernels_*.so"))
    assert len(libs) == 1 and not list((cache / "kernels").rglob(".tmp-*"))
    prompt = "The capital of France is"
    outs = {tuple(ffc.load(tmp_path / f"a{k}.ffc").generate(prompt, max_new_tokens=6).token_ids[0]) for k in range(4)}
    assert len(outs) == 1
