"""Artifacts are untrusted input: a small artifact's mutants (truncations, bit flips, JSON and
IR edits with the manifest's hashes made to match, offsets past the end, paths outside it, a
foreign library) are each loaded, and run for a few tokens when they load, in a worker process
with a deadline. None may crash the process (a signal), hang, or fail with anything but an
ArtifactError naming the file or manifest field it is about."""
import hashlib
import json
import queue
import random
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import ffc
from conftest import tiny_model_folder

WORKER = r"""
import json, sys
import ffc
from ffc import ArtifactError
for line in sys.stdin:
    k, path = line.rstrip("\n").split("\t", 1)
    print("START", k, flush=True)
    try:
        llm = ffc.load(path)
        try:
            llm.generate([[5, 6, 7, 8]], max_new_tokens=3, ignore_eos=True)
        finally:
            llm.close()
        print("LOADED", k, flush=True)
    except ArtifactError as e:
        print("REFUSED", k, json.dumps(str(e)), flush=True)
    except BaseException as e:
        print("OTHER", k, json.dumps(f"{type(e).__name__}: {e}"), flush=True)
"""
DEADLINE = 120          # seconds one mutant may take (a load that builds kernels from the plan included)


def _rehash(root: Path, rel: str) -> None:
    man = root / "manifest.json"
    m = json.loads(man.read_text())
    if rel in m["files"]:
        m["files"][rel] = hashlib.sha256((root / rel).read_bytes()).hexdigest()
        man.write_text(json.dumps(m))


def _json_edit(rel: str, edit):
    def apply(root: Path) -> None:
        p = root / rel
        data = json.loads(p.read_text())
        edit(data)
        p.write_text(json.dumps(data))
        _rehash(root, rel)
    return apply


def _bytes_edit(rel: str, edit, rehash: bool):
    def apply(root: Path) -> None:
        p = root / rel
        p.write_bytes(edit(p.read_bytes()))
        if rehash:
            _rehash(root, rel)
    return apply


def _text_edit(rel: str, old: str, new: str):
    def apply(root: Path) -> None:
        p = root / rel
        text = p.read_text()
        assert old in text, (rel, old)
        p.write_text(text.replace(old, new, 1))
        _rehash(root, rel)
    return apply


def _set(path: list, value):
    def edit(d):
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return edit


def _flip(seed: int):
    def edit(b: bytes) -> bytes:
        r = random.Random(seed)
        out = bytearray(b)
        for _ in range(1 + seed % 4):
            i = r.randrange(len(out))
            out[i] ^= 1 << r.randrange(8)
        return bytes(out)
    return edit


def mutants(root: Path) -> list[tuple[str, object, tuple[str, ...]]]:
    """(description, apply(copy), words one of which a refusal must name)."""
    m = json.loads((root / "manifest.json").read_text())
    files = sorted(m["files"])
    plan_rel, ir_rel, lib_rel = m["kernels"]["plan"], m["final_ir"], m["kernels"]["library"]
    weights = "weights/rank0.safetensors"
    plan = json.loads((root / plan_rel).read_text())
    decode = plan["graphs"]["decode"]
    buf = next(iter(decode["buffers"]))
    out = []
    for rel in files:                                      # every file truncated, hashes unchanged
        for frac in (0, 0.5):
            out.append((f"truncate {rel} to {frac}", _bytes_edit(rel, lambda b, f=frac: b[:int(len(b) * f)], False),
                        (rel,)))
    for rel in (plan_rel, ir_rel, weights, "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"):
        for frac in (0.0, 0.3, 0.97):                      # truncated, hashes made to match
            out.append((f"truncate {rel} to {frac}, rehashed",
                        _bytes_edit(rel, lambda b, f=frac: b[:int(len(b) * f)], True), (rel, Path(rel).name)))
    for k in range(8):                                     # bit flips
        rel = files[k * 7 % len(files)]
        out.append((f"flip bits of {rel}", _bytes_edit(rel, _flip(k), False), (rel,)))
    for k in range(6):
        out.append((f"flip bits of {weights}, rehashed", _bytes_edit(weights, _flip(100 + k), True), (weights,)))
        out.append((f"flip bits of {plan_rel}, rehashed", _bytes_edit(plan_rel, _flip(200 + k), True),
                    (plan_rel,)))
        out.append((f"flip bits of {ir_rel}, rehashed", _bytes_edit(ir_rel, _flip(300 + k), True), (ir_rel,)))
    # (a flip may land in a file's hash: then the refusal names that file)
    out.append(("flip bits of the manifest", _bytes_edit("manifest.json", _flip(7), False), ()))
    steps = decode["steps"]
    plan_edits = [
        (["graphs", "decode", "steps", 1, "args", 0, "offset"], 1 << 40),
        (["graphs", "decode", "steps", 1, "args", 0, "offset"], -4096),
        (["graphs", "decode", "steps", 1, "args", 0, "name"], "no-such-buffer"),
        (["graphs", "decode", "steps", 1, "args", 0, "kind"], "cache"),
        (["graphs", "decode", "steps", 1, "args", 0, "dtype"], "i64"),
        (["graphs", "decode", "steps", 2, "kernel"], steps[1]["kernel"]),
        (["graphs", "decode", "buffers", buf, "offset"], 1 << 50),
        (["graphs", "decode", "buffers", buf, "offset"], -64),
        (["graphs", "decode", "buffers", buf, "bytes"], 0),
        (["graphs", "decode", "arena_bytes"], 64),
        (["graphs", "decode", "max_tokens"], 1 << 30),
        (["graphs", "decode", "max_rows"], -1),
        (["arena_bytes"], 0),
        (["graphs", "decode", "steps"], steps[:-1]),
        (["graphs", "decode", "steps"], steps[:3] + steps[4:]),
        (["graphs", "decode", "steps"], steps + steps[-1:]),
        (["kernels", steps[1]["kernel"], "spec", "numel"], {"c": 1 << 40}),
        (["version"], 3),
        (["target"], "tpu"),
        (["dims"], ["T"]),
    ]
    first_param = next(iter(plan["params"]))
    plan_edits += [(["params", first_param, "shape"], [1 << 40, 64]), (["params", first_param, "dtype"], "q4_0")]
    for path, value in plan_edits:
        out.append((f"plan {'.'.join(map(str, path))} = {str(value)[:40]}", _json_edit(plan_rel, _set(path, value)),
                    (plan_rel,)))
    manifest_edits = [
        (["final_ir"], "../outside.ir"), (["final_ir"], "/etc/hostname"), (["kernels", "plan"], "../plan.json"),
        (["kernels", "library"], "/tmp/ffc_kernels_0000000000.so"), (["kernels", "library"], 5),
        (["files"], {}), (["files", "../../etc/hostname"], "0" * 64), (["options", "max_seq_len"], 1 << 40),
        (["options", "max_seq_len"], 0), (["options", "prefill_tokens"], -1), (["options", "max_batch"], "8"),
        (["parallel"], {"tp": 2, "pp": 1}), (["eos_token_ids"], [1 << 40]), (["format_version"], 999),
        (["speculative"], {"self_draft": {"path": "../../x"}}), (["kernels"], None), (["model"], []),
    ]
    also = {"parallel": ("weights/rank1",), "format_version": ("format version",)}   # what such a refusal names
    for path, value in manifest_edits:
        out.append((f"manifest {'.'.join(map(str, path))} = {str(value)[:40]}",
                    _json_edit("manifest.json", _set(path, value)), ("manifest", path[0], *also.get(path[0], ()))))
    ir_edits = [("f32[1,B,64]", "f32[1,B,65]"), ("graph decode(", "graph decode2("), ("eps=", "eps=1e400 ,"),
                ("rms_norm(", "linear("), ("%input_ids : i64", "%input_ids : f32")]
    for old, new in ir_edits:
        out.append((f"IR {old!r} -> {new!r}", _text_edit(ir_rel, old, new), (ir_rel,)))
    out.append(("IR: a node's line dropped", _ir_drop_line(ir_rel), (ir_rel,)))

    def header(edit):                                      # the safetensors header, rehashed
        def apply(b: bytes) -> bytes:
            n = int.from_bytes(b[:8], "little")
            h = json.loads(b[8:8 + n])
            edit(h)
            text = json.dumps(h).encode()
            return len(text).to_bytes(8, "little") + text + b[8 + n:]
        return apply
    name = next(k for k in json.loads((root / weights).read_bytes()[8:8 + int.from_bytes(
        (root / weights).read_bytes()[:8], "little")]) if k != "__metadata__")
    for edit in (_set([name, "data_offsets"], [0, 1 << 40]), _set([name, "dtype"], "F16"), _set([name, "shape"], [3]),
                 _set([name, "data_offsets"], [8, 4])):
        out.append((f"weights header {name} edited", _bytes_edit(weights, header(edit), True), (weights, name)))
    out.append(("weights header length past the end", _bytes_edit(weights, lambda b: (1 << 62).to_bytes(8, "little")
                                                                  + b[8:], True), (weights,)))
    # a foreign library (random bytes, or none) with a matching hash: rebuilt from the plan, runs
    out.append(("library replaced by random bytes, rehashed", _bytes_edit(lib_rel, lambda b: random.Random(1).randbytes(
        4096), True), ()))
    out.append(("library truncated, rehashed", _bytes_edit(lib_rel, lambda b: b[:len(b) // 3], True), ()))
    return out


def _ir_drop_line(rel: str):
    def apply(root: Path) -> None:
        p = root / rel
        lines = p.read_text().splitlines()
        k = next(i for i, ln in enumerate(lines) if ln.strip().startswith("%") and "rms_norm" in ln)
        p.write_text("\n".join(lines[:k] + lines[k + 1:]) + "\n")
        _rehash(root, rel)
    return apply


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory, smol_source):
    folder = tiny_model_folder(tmp_path_factory.mktemp("fz") / "m", "llama", smol_source)
    return Path(ffc.compile(str(folder), str(folder.parent / "tiny.ffc"), max_seq_len=64))


def _run_worker(jobs: list[tuple[int, Path]]) -> dict[int, tuple[str, str]]:
    """Each job's outcome: LOADED / REFUSED msg / OTHER msg / CRASH (the worker died) / HANG
    (no answer within DEADLINE); a worker that dies or stalls is replaced, from the next job on."""
    results: dict[int, tuple[str, str]] = {}
    todo = list(jobs)
    while todo:
        proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        proc.stdin.write("".join(f"{k}\t{p}\n" for k, p in todo))
        proc.stdin.close()
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout] + [lines.put(None)], daemon=True).start()
        current = None
        while True:
            try:
                line = lines.get(timeout=DEADLINE)
            except queue.Empty:
                proc.kill()
                proc.wait()
                results[current if current is not None else todo[0][0]] = ("HANG", "")
                break
            if line is None:
                rc = proc.wait()
                if current is None:
                    current = todo[0][0]
                if current not in results:
                    results[current] = ("CRASH", f"exit {rc}")
                break
            kind, k, *rest = line.rstrip("\n").split(" ", 2)
            if kind == "START":
                current = int(k)
            else:
                results[int(k)] = (kind, json.loads(rest[0]) if rest else "")
        todo = [(k, p) for k, p in todo if k not in results]
    return results


def test_hundred_mutated_artifacts_are_refused_or_run(tiny_artifact, tmp_path):
    cases = mutants(tiny_artifact)
    assert len(cases) >= 100, len(cases)
    jobs = []
    for k, (what, apply, _) in enumerate(cases):
        dst = tmp_path / f"m{k:03d}.ffc"
        shutil.copytree(tiny_artifact, dst, symlinks=True)
        apply(dst)
        jobs.append((k, dst))
    with ThreadPoolExecutor(2) as pool:       # two workers, half of the mutants each
        results = {k: v for part in pool.map(_run_worker, (jobs[0::2], jobs[1::2])) for k, v in part.items()}
    bad = []
    for k, (what, _, names) in enumerate(cases):
        kind, msg = results[k]
        if kind == "LOADED" or (kind == "REFUSED" and (not names or any(n in msg for n in names))):
            continue
        bad.append(f"{what}: {kind} {msg[:200]}")
    assert not bad, f"{len(bad)} of {len(cases)} mutants:\n" + "\n".join(bad)


def test_a_rank_reads_only_the_ir_its_driver_verified(tiny_artifact, tmp_path):
    """Ranks skip verifying the IR (their driver did, seconds per rank for a large model), so
    they take it only with the bytes the manifest hashes: an IR changed in between is refused."""
    from ffc.artifact import Artifact
    dst = tmp_path / "a.ffc"
    shutil.copytree(tiny_artifact, dst, symlinks=True)
    art = Artifact.open(dst)
    assert "decode" in art.read_module(verify=False).graphs
    ir = dst / art.manifest["final_ir"]
    ir.write_text(ir.read_text() + "\n")
    with pytest.raises(ffc.ArtifactError, match="changed after it was verified"):
        art.read_module(verify=False)


def test_an_ir_verified_here_is_not_verified_again(tiny_artifact, tmp_path, monkeypatch):
    """ffc.load verifies an IR file once per machine (its SHA-256 recorded in the trust registry:
    seconds of shape checks saved in every later process); an edited IR is verified (and a bad
    edit refused) however its manifest hash was made to match."""
    from ffc import artifact
    dst = tmp_path / "a.ffc"
    shutil.copytree(tiny_artifact, dst, symlinks=True)
    ffc.load(dst).close()                                   # verified (or already known): recorded

    def no_verify(module):
        raise AssertionError("verified again")
    monkeypatch.setattr(artifact, "verify_module", no_verify)
    ffc.load(dst).close()
    rel = json.loads((dst / "manifest.json").read_text())["final_ir"]
    ir = dst / rel
    ir.write_text(ir.read_text().replace("rms_norm", "layer_norm", 1))
    _rehash(dst, rel)
    with pytest.raises(AssertionError, match="verified again"):
        ffc.load(dst)
