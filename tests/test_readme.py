"""The README's commands work as written. Every command of its fenced bash blocks is parsed: an
`ffc` command line by ffc's own argument parser (no option the parser lacks, no value it
refuses), a benchmark script by its own (`--help`). The ones that need no GPU, no second host
and no minutes of compiling or timing are then run literally, as a shell runs them, in a
directory where `smol.ffc` is a fresh artifact of the default model; SKIP says why each
other one is not run here (and which test runs that path instead)."""
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from ffc.cli_args import build_parser
from ffc.util import free_port

ROOT = Path(__file__).resolve().parents[1]

# (start of the command, why it is not run here) - the first match decides
SKIP = [
    ("pip install", "installs the project (CI runs it)"),
    ("torchrun", "a second host (tests/test_parallel.py runs two nodes on localhost)"),
    ("ffc compile smollm2-135m --target cuda", "CUDA kernels; test_codegen builds them with nvcc"),
    ("ffc compile MODEL", "MODEL is a placeholder"),
    ("ffc compile", "20-60 s each; each option is compiled by its own test (test_cli, test_quant, test_parallel, "
                    "test_speculative); the dry run below is run"),
    ("ffc bench", "minutes of timed runs; test_cli runs it on a short setting, test_speculative its --speculative"),
    ("ffc calibrate", "a minute of measuring; test_search runs it"),
    ("ffc eval", "needs the quantized artifact; test_quant runs eval"),
    ("ffc build", "rebuilds every object of a new artifact; test_cli runs it after an edit"),
    ("ffc debug compare", "test_debug_compare and test_cli run it on a model and on an artifact"),
    ("ffc inspect smol-tp2.ffc", "needs the tp=2 artifact; test_parallel inspects its strategy"),
    ("ffc serve smol.ffc --speculative", "test_server runs a speculative server"),
    ("ffc serve smol.ffc --host", "the server below (the one the curl examples talk to) is run"),
    ("python benchmarks/", "benchmarks take minutes; their --help is run"),
]
DRY_RUN = "ffc compile smollm2-135m --tp auto --pp auto --devices 4 --dry-run"


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    out = []
    for body in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in body.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def _words(line: str) -> list[str]:
    return shlex.split(line, comments=True)


def _skip(line: str):
    if line.startswith(DRY_RUN):
        return None
    return next((why for start, why in SKIP if line.startswith(start)), None)


def test_every_command_parses():
    """Each `ffc` command (alone or after `&&`, or under torchrun -m ffc.cli) parses with ffc's
    parser; each benchmark script answers --help."""
    parser = build_parser()
    scripts = set()
    for line in readme_commands():
        for part in line.split("&&"):
            words = _words(part)
            if not words:
                continue
            if words[0] == "ffc":
                args = words[1:]
            elif words[0] == "torchrun":
                args = words[words.index("ffc.cli") + 1:]
            elif words[0] == "python" and words[1].startswith("benchmarks/"):
                scripts.add(words[1])
                continue
            else:
                continue
            try:
                parser.parse_args(args)
            except SystemExit as e:
                pytest.fail(f"README command does not parse (exit {e.code}): {part.strip()}")
    assert len(scripts) >= 5
    for s in sorted(scripts):
        r = subprocess.run([sys.executable, s, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "usage" in r.stdout, f"{s} --help: {r.stderr[-1500:]}"


def _sh(line: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", line], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_commands_run_as_written(smol_artifact, tmp_path):
    (tmp_path / "smol.ffc").symlink_to(smol_artifact)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "The capital of France is"}\n"Once upon a time"\n')   # --batch-file
    lines, seen = [], set()
    for line in readme_commands():          # a command shown twice (other comment) runs once
        if " ".join(_words(line)) not in seen:
            seen.add(" ".join(_words(line)))
            lines.append(line)
    ran = [line for line in lines
           if _skip(line) is None and line.startswith("ffc ") and not line.startswith("ffc serve")]
    with ThreadPoolExecutor(2) as pool:       # independent processes: two at a time
        results = list(pool.map(lambda line: _sh(line, tmp_path), ran))
    for line, r in zip(ran, results):
        assert r.returncode == 0, f"{line}\n{r.stderr[-2000:]}"
        assert r.stdout.strip(), f"{line} printed nothing"
    assert any(x.startswith("ffc run") for x in ran) and any(x.startswith("ffc inspect") for x in ran)
    assert any(x.startswith(DRY_RUN) for x in ran) and len(ran) >= 8, ran
    # the server the curl examples talk to, on a free port (the only change: 8000 may be taken)
    serve = next(x for x in lines if x.startswith("ffc serve") and _skip(x) is None)
    curls = [x for x in lines if x.startswith("curl ")]
    assert len(curls) >= 2
    port = str(free_port())
    proc = subprocess.Popen(["bash", "-c", "exec " + serve.replace("8000", port)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        for line in curls:
            line = line.replace("8000", port)
            if shutil.which("curl") is None:       # what curl sends: form data, no JSON content type
                m = re.search(r"localhost:\d+(\S+) -d '(.*)'", line)
                out = httpx.post(f"http://127.0.0.1:{port}{m.group(1)}", content=m.group(2),
                                 headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=120).text
            else:
                r = _sh(line, tmp_path, timeout=120)
                assert r.returncode == 0, f"{line}\n{r.stderr}"
                out = r.stdout
            assert '"choices"' in out or "data: " in out, f"{line}\n{out[:1000]}"
            assert "error" not in out.lower()[:200], f"{line}\n{out[:1000]}"
    finally:
        proc.kill()
        proc.wait(30)
