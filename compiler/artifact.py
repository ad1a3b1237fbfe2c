"""The artifact: a directory written atomically and checked on load.

    manifest.json              format and library versions, model config, options, passes,
                               SHA-256 of every other file
    ir/NN-pass.ir              the IR after every pass (00-input.ir is the frontend's)
    weights/rank0.safetensors  weights already transformed (fused QKV, gate/up, ...)
    tokenizer/                 tokenizer files and chat template
No pickle anywhere. An artifact is untrusted input: ``check_manifest`` gives every field the
loader reads its type, every path it names must stay inside the directory (symbolic links
resolved; none may lead out of it), and the kernel library can only be
``kernels/lib/ffc_kernels_<hash>...so``; anything else is an ArtifactError naming the field.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Optional

from ffc.ir import Module, parse, verify_module
from ffc.ir.text import IRParseError
from ffc.ir.verify import VerifyError
from ffc.plan.codec import PlanFormatError
from ffc.plan.schema import Plan

from .errors import ArtifactError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # another user's process
        return True
    return True


def remove_stale(output: Path) -> None:
    """Temporary and replaced directories of ``output`` that a killed writer left (SIGKILL, a
    crash: a compile, an offload store's build): their writer's process is gone."""
    pattern = re.compile(rf"^\.{re.escape(output.name)}\.(?:tmp|old)-(\d+)(?:-|$)")
    for p in output.parent.iterdir():
        m = pattern.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


class ArtifactWriter:
    """Build an artifact in a temporary sibling directory; ``commit`` renames it into place."""

    def __init__(self, output: str | os.PathLike):
        self.output = Path(output).resolve()
        if self.output.exists() and not (self.output / MANIFEST).is_file():
            raise ArtifactError(f"{self.output} exists and is not an ffc artifact; choose another -o path")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(self.output)
        # the writer's pid in the name: a later compile removes what a killed one left
        self.root = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.tmp-{os.getpid()}-", dir=self.output.parent))

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        shutil.rmtree(self.root, ignore_errors=True)  # after commit this is already gone

    def path(self, rel: str) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def commit(self, manifest: dict) -> Path:
        files = sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())
        manifest = dict(manifest, format_version=FORMAT_VERSION,
                        files={f: sha256(self.root / f) for f in files})
        self.path(MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        old = None
        if self.output.exists():
            old = self.output.parent / f".{self.output.name}.old-{os.getpid()}"
            os.replace(self.output, old)
        os.replace(self.root, self.output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.output


# the one place a kernel library may sit in an artifact, named as build.py names it
_LIBRARY = re.compile(r"^kernels/lib/ffc_kernels_[0-9a-f]{8,64}(\.[A-Za-z0-9_-]+)*\.so$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def inside(root: Path, rel, what: str) -> Path:
    """``root / rel`` when ``rel`` is a relative path that stays inside ``root`` (symbolic links
    resolved); otherwise an ArtifactError naming ``what`` (the manifest field)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise ArtifactError(f"{what} in {root / MANIFEST} is {rel!r:.80}, not a path inside the artifact; "
                            "recompile the artifact")
    parts = PurePosixPath(rel)
    if parts.is_absolute() or ".." in parts.parts:
        raise ArtifactError(f"{what} {rel!r} in {root / MANIFEST} points outside the artifact; refusing it "
                            "(recompile the artifact)")
    full = root / parts
    if not full.resolve().is_relative_to(root.resolve()):
        raise ArtifactError(f"{what} {rel!r} in {root / MANIFEST} resolves outside the artifact (through a "
                            "symbolic link); refusing it (recompile the artifact)")
    return full


def _escaping_links(root: Path) -> list[str]:
    """Symbolic links in the artifact's tree whose target is outside it."""
    real = root.resolve()
    out = []
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = Path(dirpath) / name
            if p.is_symlink() and not p.resolve().is_relative_to(real):
                out.append(str(p.relative_to(root)))
    return out


def _expect(cond: bool, where: Path, field: str, want: str, value) -> None:
    if not cond:
        raise ArtifactError(f"{where}: {field} must be {want}, got {str(value)[:80]!r}; recompile the artifact")


def check_manifest(manifest, root: Path) -> dict:
    """The fields the loader reads have the types it reads them as, and every path it names
    stays inside the artifact; an ArtifactError names the file and the field otherwise."""
    where = root / MANIFEST
    _expect(isinstance(manifest, dict), where, "the manifest", "a JSON object", manifest)
    files = manifest.get("files")
    _expect(isinstance(files, dict) and all(isinstance(v, str) and _SHA256.match(v) for v in files.values()),
            where, "files", "an object of file -> SHA-256", files)
    for rel in files:
        inside(root, rel, "files entry")
    inside(root, manifest.get("final_ir"), "final_ir")
    model = manifest.get("model")
    _expect(isinstance(model, dict) and isinstance(model.get("source"), str)
            and isinstance(model.get("config", {}), dict), where, "model", "an object with a source", model)
    options = manifest.get("options")
    _expect(isinstance(options, dict), where, "options", "an object", options)
    msl = options.get("max_seq_len")
    _expect(msl is None or (type(msl) is int and msl >= 2), where, "options.max_seq_len", "an integer >= 2", msl)
    eos = manifest.get("eos_token_ids", [])
    _expect(isinstance(eos, list) and all(type(e) is int and e >= 0 for e in eos), where, "eos_token_ids",
            "a list of token ids", eos)
    par = manifest.get("parallel")
    if par is not None:
        _expect(isinstance(par, dict), where, "parallel", "an object or null", par)
        for key in ("tp", "pp"):
            v = par.get(key, 1)
            _expect(type(v) is int and 1 <= v <= 64, where, f"parallel.{key}", "an integer in 1..64", v)
        if "strategy" in par:
            inside(root, par["strategy"], "parallel.strategy")
    kernels = manifest.get("kernels")
    if kernels is not None:
        _expect(isinstance(kernels, dict), where, "kernels", "an object or null", kernels)
        inside(root, kernels.get("plan"), "kernels.plan")
        lib = kernels.get("library")
        _expect(isinstance(lib, str) and bool(_LIBRARY.match(lib)), where, "kernels.library",
                "kernels/lib/ffc_kernels_<hash>...so", lib)
        inside(root, lib, "kernels.library")
        _expect(kernels.get("target", "cpu") in ("cpu", "cuda"), where, "kernels.target", "cpu or cuda",
                kernels.get("target"))
    spec = manifest.get("speculative")
    if spec is not None:
        _expect(isinstance(spec, dict), where, "speculative", "an object or null", spec)
        curve = spec.get("verify_cost", {})
        _expect(isinstance(curve, dict) and all(k.isdigit() and 1 <= int(k) <= 1 << 20 and type(v) in (int, float)
                                                and 0 < v < 1e6 for k, v in curve.items()),
                where, "speculative.verify_cost", "an object of token count -> relative step time", curve)
    sd = (spec or {}).get("self_draft")
    if sd is not None:
        _expect(isinstance(sd, dict), where, "speculative.self_draft", "an object", sd)
        inside(root, sd.get("path"), "speculative.self_draft.path")
        for key in ("acceptance", "draft_cost", "node_cost"):
            v = sd.get(key)
            _expect(type(v) in (int, float) and 0 <= v <= 1e3, where, f"speculative.self_draft.{key}",
                    "a non-negative number", v)
        _expect(isinstance(sd.get("skip_layers"), list) and all(type(x) is int for x in sd["skip_layers"]),
                where, "speculative.self_draft.skip_layers", "a list of layer indices", sd.get("skip_layers"))
    return manifest


# what `ffc build` writes again (the sources a user may edit, the ninja file, the library)
REBUILT = ("kernels/src/", "kernels/lib/", "kernels/build.ninja")


def _ranks(manifest: dict) -> int:
    par = manifest.get("parallel") if isinstance(manifest.get("parallel"), dict) else {}
    return int(par.get("tp", 1) or 1) * int(par.get("pp", 1) or 1)


def read_manifest(path: str | os.PathLike, check_hashes: bool = True, skip: tuple[str, ...] = ()) -> dict:
    """The manifest of the artifact at ``path`` after checking format version and the hashes of
    its files (but those whose path starts with one of ``skip``)."""
    root = Path(path)
    if not root.exists():
        raise ArtifactError(f"artifact {str(path)!r} does not exist; compile one with `ffc compile MODEL -o {path}`")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{str(path)!r} is not an ffc artifact (no {MANIFEST}); compile one with "
                            f"`ffc compile MODEL -o {path}`")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is corrupted ({e}); recompile the artifact") from None
    _expect(isinstance(manifest, dict), mpath, "the manifest", "a JSON object", manifest)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        source = (manifest.get("model") or {}).get("source", "MODEL") if isinstance(manifest.get("model"), dict) \
            else "MODEL"
        raise ArtifactError(
            f"{path} has artifact format version {version!r}, this ffc reads version {FORMAT_VERSION}; "
            f"recompile it with this ffc (`ffc compile {source} -o {path}`)")
    check_manifest(manifest, root)
    links = _escaping_links(root)
    if links:
        raise ArtifactError(f"{path}: {links[0]} is a symbolic link out of the artifact; refusing it "
                            "(recompile the artifact)")
    files = manifest["files"]
    # what the runtime reads must be covered by a hash (an empty list would check nothing)
    needed = [manifest.get("final_ir"), *(f"weights/rank{r}.safetensors" for r in range(_ranks(manifest))),
              *(f"tokenizer/{p.name}" for p in sorted((root / "tokenizer").glob("*")) if p.is_file())]
    if isinstance(manifest.get("kernels"), dict):
        needed += [manifest["kernels"].get("plan"), manifest["kernels"].get("library")]
    unlisted = [f for f in needed if isinstance(f, str) and f not in files and not f.startswith(skip)]
    if unlisted:
        raise ArtifactError(f"{path}: artifact file {unlisted[0]} has no hash in the manifest's files; "
                            "recompile the artifact")
    if check_hashes:
        for rel, digest in files.items():
            if rel.startswith(skip):
                continue
            f = root / rel
            if not f.is_file():
                raise ArtifactError(f"artifact file {rel} is missing from {path}; recompile the artifact")
            if sha256(f) != digest:
                raise ArtifactError(f"artifact file {rel} in {path} is corrupted or was edited (SHA-256 "
                                    "mismatch); recompile the artifact, or edit the IR and compile it with "
                                    "`ffc compile MODEL --from-ir FILE`")
    return manifest


def refresh_manifest(path: str | os.PathLike, updates: dict) -> dict:
    """After ``ffc build``: apply ``updates`` to the manifest and re-hash what the build wrote
    (REBUILT) only. Every other file is verified first, so a build never blesses a corrupted
    or edited weight, IR or plan file."""
    root = Path(path)
    manifest = read_manifest(root, check_hashes=True, skip=REBUILT)
    manifest.update(updates)
    kept = {f: d for f, d in manifest["files"].items() if not f.startswith(REBUILT)}
    rebuilt = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                     if p.is_file() and str(p.relative_to(root)).startswith(REBUILT))
    manifest["files"] = {**kept, **{f: sha256(root / f) for f in rebuilt}}
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, root / MANIFEST)
    return manifest


class Artifact:
    """An artifact as the runtime reads it: the manifest parsed once (in the process that loads
    it; handed as is to the ranks it starts), and what is in it by name."""

    def __init__(self, root, manifest: dict):
        self.root = Path(root)
        self.manifest = check_manifest(manifest, self.root)

    @classmethod
    def open(cls, path, check_hashes: bool = True) -> "Artifact":
        return cls(path, read_manifest(path, check_hashes=check_hashes))

    def path(self, rel: str, what: str = "a path") -> Path:
        """``rel`` inside the artifact (refused when it would lead out of it)."""
        return inside(self.root, rel, what)

    @property
    def tp(self) -> int:
        return int((self.manifest.get("parallel") or {}).get("tp", 1))

    @property
    def pp(self) -> int:
        return int((self.manifest.get("parallel") or {}).get("pp", 1))

    @property
    def ranks(self) -> int:
        return self.tp * self.pp

    @property
    def final_ir(self) -> str:
        return self.manifest.get("final_ir", "")

    @property
    def kernels(self) -> Optional[dict]:
        """The manifest's kernels entry (plan, library, target), or None: no generated kernels."""
        return self.manifest.get("kernels") or None

    @property
    def target(self) -> str:
        return (self.kernels or {}).get("target", "cpu")

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.manifest.get("eos_token_ids", []))

    @property
    def max_seq_len(self) -> Optional[int]:
        return (self.manifest.get("options") or {}).get("max_seq_len")

    @property
    def memory_budget(self) -> Optional[int]:
        """The budget it was compiled for (``--memory-budget``): loads offload weights under it."""
        v = (self.manifest.get("options") or {}).get("memory_budget")
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    def read_module(self, verify: bool = True) -> Module:
        """The final IR, parsed and verified. ``verify=False``: for bytes verified before (by the
        driver of this rank, or on an earlier load here: runtime.llm.read_verified_module), only
        checked against the manifest's hash, so they are the ones that were verified."""
        try:
            data = self.path(self.final_ir).read_bytes()
            if not verify and hashlib.sha256(data).hexdigest() != self.manifest["files"].get(self.final_ir):
                raise ArtifactError(f"artifact IR {self.final_ir} changed after it was verified (SHA-256 "
                                    "mismatch); recompile the artifact")
            module = parse(data.decode())
            if verify:
                verify_module(module)
        except (OSError, UnicodeDecodeError, IRParseError, VerifyError) as e:
            raise ArtifactError(f"artifact IR {self.final_ir} is unreadable: {e}; recompile the artifact") from None
        kinds = ("prefill", "decode")
        need = set(kinds) if self.pp == 1 else {f"{g}_stage{k}" for g in kinds for k in range(self.pp)}
        missing = sorted(need - set(module.graphs))
        if missing:
            raise ArtifactError(f"artifact IR {self.final_ir} has no graph {missing[0]} (it has "
                                f"{', '.join(sorted(module.graphs)) or 'none'}); recompile the artifact")
        for name in need:
            inputs = {v.name for v in module.graphs[name].inputs}
            for want in ("kv_cache", "block_tables"):
                if want not in inputs:
                    raise ArtifactError(f"artifact IR {self.final_ir}: graph {name} has no input %{want}; "
                                        "recompile the artifact")
        return module

    @cached_property
    def plan(self) -> Plan:
        """The plan its kernels were generated from (checked against the schema)."""
        rel = (self.kernels or {}).get("plan")
        if rel is None:
            raise ArtifactError(f"{self.root} has no generated kernels (compiled with --no-codegen)")
        try:
            data = json.loads(self.path(rel).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{self.path(rel)} is unreadable ({e}); recompile the artifact") from None
        try:
            return Plan.from_json(data)
        except PlanFormatError as e:
            raise ArtifactError(f"{self.path(rel)}: {e}") from None
