"""Building generated sources: a build.ninja, one pybind11 extension, cached by content hash.

The artifact keeps ``kernels/src`` (readable and editable) and ``kernels/build.ninja``, which
builds in a stable directory of the cache per artifact path (``$FFC_CACHE_DIR/kernels/builds/``,
objects kept: ``ffc build`` or ``ninja -f ART/kernels/build.ninja`` after an edit compiles that
source only). Each library is also published under its content hash
(``$FFC_CACHE_DIR/kernels/<hash>/``), so a recompile of an unchanged model, or a second artifact
with the same kernels, builds nothing (its first ``ffc build`` then compiles every object once).
The executor and its pybind11 binding (csrc/executor.cpp, the same for every model and most of a
library's compile time) are compiled once per content, flags and compiler into
``$FFC_CACHE_DIR/kernels/runtime/<hash>/`` and linked into every library from there.
The library is copied into the artifact (``kernels/lib``): a load on the machine that built it
needs no compiler; elsewhere the kernels are built again from the plan
(runtime/kernel_library.py says which files ffc vouches for).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Optional

import ninja
import pybind11
import torch

from ffc.lower import lower_module
from ffc.plan.schema import Target
from ffc.runtime.kernel_library import load_library, trusted, vouch

from . import knobs
from .artifact import Artifact
from .codegen import TARGETS, KernelSpan, render_sources
from .errors import ArtifactError, FfcError


class BuildError(FfcError):
    """Generated code did not compile."""


def _torch_lib() -> Path:
    return Path(torch.__file__).parent / "lib"


def toolchain(target: Target) -> dict:
    """Compiler commands and flags for ``target`` on this machine."""
    target = Target(target)
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise BuildError(f"no C++ compiler: {cxx!r} is not on PATH; install g++ or set CXX")
    includes = [pybind11.get_include(), sysconfig.get_paths()["include"]]
    cflags = ["-O3", f"-march={knobs.cpu_arch()}", "-std=c++17", "-fPIC", "-fopenmp", "-fno-math-errno", "-fvisibility=hidden",
              "-Wall", "-Wno-unused-function", "-Wno-unused-variable", "-Wno-uninitialized", "-Wno-maybe-uninitialized"]
    tc = {"cxx": cxx, "cflags": cflags, "includes": includes,
          "ldflags": ["-shared", "-fopenmp", "-Wl,-Bsymbolic", f"-L{_torch_lib()}", "-ltorch_cpu",
                      f"-Wl,-rpath,{_torch_lib()}"],
          "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX") or ".so"}
    if target is Target.CUDA:
        nvcc = os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
        if not Path(nvcc).exists() and shutil.which(nvcc) is None:
            raise BuildError("no CUDA compiler: nvcc is not on PATH; install the CUDA toolkit or set NVCC")
        tc["nvcc"] = nvcc
        tc["nvflags"] = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-lineinfo"]
        for arch in knobs.cuda_archs():
            tc["nvflags"] += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return tc


def _compiler_version(cmd: str) -> str:
    try:
        return subprocess.run([cmd, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError):
        return "?"


def content_key(sources: dict[str, str], tc: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + sources[name].encode() + b"\0")
    h.update(repr(sorted((k, v) for k, v in tc.items() if k != "nvcc")).encode())
    h.update(_compiler_version(tc["cxx"]).encode())
    h.update(sys.version.encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:20]


def module_name(key: str) -> str:
    return f"ffc_kernels_{key}"


def runtime_dir(target: Target, tc: dict, sources: dict[str, str]) -> Path:
    """Where the executor of ``sources`` is compiled: keyed by the support files' content, the
    flags and the compiler, so every model's library links the one object built there."""
    support = {n: sources[n] for n in TARGETS[Target(target)]["support"] if n in sources}
    return (knobs.cache_dir() / "kernels" / "runtime" / content_key(support, tc)).resolve()


# CPU kernels are compiled with the support header precompiled (a third of the time: most of it is
# <immintrin.h>) and force-included; its guard macro makes the sources' own #include a no-op. The
# header is the runtime directory's copy, so an edit of src/ffc_*.h needs `ffc build` (as for the
# executor), which writes a build file naming the runtime directory of that content.
PCH = "$rtdir/src/ffc_cpu.h.gch"
_PCH_USE = "-include $rtdir/src/ffc_cpu.h -Winvalid-pch "


def write_ninja(build_dir: Path, target: Target, tc: dict, key: str, sources: list[str], rt_dir: Path) -> str:
    """build.ninja text: compile every source, link one extension named after the content key.
    Sources are read through ``build_dir/src`` (a link to the kernels' sources) and nothing in a
    command names the key but the one-line entry point, so an edit recompiles its own object only.
    The executor is compiled from its own copy in ``rt_dir`` (runtime_dir), shared by every
    library: a generator rule, so a build directory without a log entry for it does not rebuild it."""
    mod = module_name(key)
    inc = " ".join(f"-I{p}" for p in ["$builddir/src"] + tc["includes"])
    rt_inc = " ".join(f"-I{p}" for p in ["$rtdir/src"] + tc["includes"])
    lines = [
        "# generated by ffc: builds these kernels into one Python extension",
        f"# rebuild after editing src/: ffc build <artifact>   (or: ninja -f <artifact>/kernels/build.ninja)",
        "# the executor is compiled once for every model from its copy in $rtdir (an edit of src/ffc_*.h",
        "# or src/executor*: ffc build <artifact>, which compiles that content into a runtime directory of its own)",
        f"builddir = {build_dir}",
        f"rtdir = {rt_dir}",
        f"module = {mod}",
        f"cxx = {tc['cxx']}",
        f"cflags = {' '.join(tc['cflags'])} {inc}",
        f"ldflags = {' '.join(tc['ldflags'])}",
        "rule cxx",
        f"  command = $cxx -MMD -MF $out.d {_PCH_USE if target is Target.CPU else ''}$cflags -c $in -o $out",
        "  depfile = $out.d",
        "  description = CXX $in",
        "rule cxx_runtime",   # written aside and renamed: a killed compile never leaves half an object
        f"  command = $cxx -MMD -MF $out.d -MT $out {' '.join(tc['cflags'])} {rt_inc} -c $in -o $out.tmp "
        "&& mv -f $out.tmp $out",
        "  depfile = $out.d",
        "  generator = 1",
        "  description = CXX $in (the executor, for every model)",
        "rule modinit",       # PyInit_<module> -> the executor's definition (see csrc/executor.cpp)
        "  command = printf '%s\\n' 'extern \"C\" __attribute__((visibility(\"hidden\"))) void *ffc_module_init(void);' "
        "'extern \"C\" __attribute__((visibility(\"default\"))) void *PyInit_$module(void) { return ffc_module_init(); }' "
        "| $cxx -x c++ -fPIC -c - -o $out",
        "  description = MODULE $module",
        "rule link",          # linked aside and renamed: a killed link never leaves a half library
        "  command = $cxx $in -o $out.tmp $ldflags && mv -f $out.tmp $out",
        "  description = LINK $out",
    ]
    if target is Target.CUDA:
        lines += [f"nvcc = {tc['nvcc']}",
                  f"nvflags = {' '.join(tc['nvflags'])} {inc}",
                  "rule nvcc",
                  "  command = $nvcc $nvflags -c $in -o $out",
                  "  description = NVCC $in",
                  "rule nvcc_runtime",
                  f"  command = $nvcc {' '.join(tc['nvflags'])} {rt_inc} -c $in -o $out.tmp && mv -f $out.tmp $out",
                  "  generator = 1",
                  "  description = NVCC $in (the executor, for every model)"]
    pch = ""
    if target is Target.CPU:   # the kernel header precompiled once for every model, beside the executor
        lines += ["rule pch",
                  f"  command = $cxx {' '.join(tc['cflags'])} {rt_inc} -x c++-header $in -o $out.tmp "
                  "&& mv -f $out.tmp $out",
                  "  generator = 1",
                  "  description = PCH $in (for every model)",
                  f"build {PCH}: pch $rtdir/src/{TARGETS[Target.CPU]['header']}"]
        pch = f" || {PCH}"
    runtime = TARGETS[Target(target)]["runtime"]
    objs = ["$builddir/obj/module_init.o"]
    lines.append("build $builddir/obj/module_init.o: modinit")
    for name in sorted(sources):
        if not name.endswith((".cpp", ".cu")):
            continue
        rule = "nvcc" if name.endswith(".cu") else "cxx"
        if name == runtime:
            obj = f"$rtdir/obj/{name}.o"
            lines.append(f"build {obj}: {rule}_runtime $rtdir/src/{name}")
        else:
            obj = f"$builddir/obj/{name}.o"
            lines.append(f"build {obj}: {rule} $builddir/src/{name}" + (pch if rule == "cxx" else ""))
        objs.append(obj)
    lines.append(f"build $builddir/$module{tc['ext_suffix']}: link {' '.join(objs)}")
    if target is Target.CUDA:  # nvcc's link step; the CUDA runtime linked in (it finds the driver when first
        lines.append("  cxx = $nvcc")   # called), so the library needs no libcudart or CUDA torch where it runs
        lines.append("  ldflags = -shared -Xcompiler -fPIC -Xlinker -Bsymbolic --cudart static")
    lines.append(f"default $builddir/$module{tc['ext_suffix']}")
    return "\n".join(lines) + "\n"


def _ninja() -> str:
    exe = Path(ninja.BIN_DIR) / "ninja"
    if exe.exists():
        return str(exe)
    found = shutil.which("ninja")
    if not found:
        raise BuildError("ninja is not installed; pip install ninja")
    return found


def _explain(output: str, src_dir: Path, spans: list[KernelSpan], ninja_file: Path) -> str:
    """The first compiler error with the file, the kernel it falls in, and how to reproduce."""
    m = re.search(r"^(\S+?\.(?:cpp|cu|h)):(\d+):(?:\d+:)? (?:fatal )?error:?(.*)$", output, re.M)
    where = ""
    if m:
        fname, line = Path(m.group(1)).name, int(m.group(2))
        kernel = next((s.kernel for s in spans if s.file == fname and s.first_line <= line <= s.last_line), None)
        where = f"{src_dir / fname}:{line}" + (f" in kernel {kernel}" if kernel else "") + f":{m.group(3)}\n"
    tail = "\n".join(output.strip().splitlines()[-25:])
    return (f"generated code failed to compile\n{where}reproduce with: {_ninja()} -f {ninja_file} -v\n"
            f"--- compiler output (last lines) ---\n{tail}")


def builddir_for(kernels_dir: Path) -> Path:
    """Where the kernels at ``kernels_dir`` (an artifact's final path) are built: a stable cache
    directory keeping their objects, so ninja rebuilds only what an edit changed."""
    key = hashlib.sha256(str(Path(kernels_dir).resolve()).encode()).hexdigest()[:16]
    return knobs.cache_dir() / "kernels" / "builds" / key


def _link_sources(build_dir: Path, src_dir: Path) -> None:
    """Point ``build_dir/src`` at ``src_dir`` (replaced atomically)."""
    tmp = build_dir / f".src-{os.getpid()}"
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(Path(src_dir).resolve(), tmp)
    os.replace(tmp, build_dir / "src")


def settle(root: Path) -> None:
    """After an artifact is renamed into place: its build directories read the sources at its
    final path (during the compile they read the temporary directory's, or, when the library
    came from the cache, did not exist: ``ninja -f ART/kernels/build.ninja`` builds there too)."""
    for kdir in (root / "kernels", root / "draft" / "kernels"):
        bdir = builddir_for(kdir)
        if (kdir / "src").is_dir():
            bdir.mkdir(parents=True, exist_ok=True)
            with _locked(bdir):
                _link_sources(bdir, kdir / "src")


class _locked:
    """An exclusive lock beside ``path`` (processes sharing a cache take turns)."""

    def __init__(self, path: Path):
        self.path = Path(path).parent / f"{Path(path).name}.lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "w")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.f.close()


def _build_runtime(rt_dir: Path, target: Target, sources: dict[str, str], build_file: Path, log) -> None:
    """The executor object (and on CPUs the precompiled kernel header) in ``rt_dir``, compiled
    (through ``build_file``'s rules for them) unless a build for any model already did: one
    process at a time, the others then find them."""
    runtime = TARGETS[Target(target)]["runtime"]
    obj = rt_dir / "obj" / f"{runtime}.o"
    targets = [obj] + ([Path(PCH.replace("$rtdir", str(rt_dir)))] if Target(target) is Target.CPU else [])
    with _locked(rt_dir):
        if all(t.exists() for t in targets):
            return
        src = rt_dir / "src"
        if not src.is_dir():                 # published whole, under the lock
            rt_dir.mkdir(exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=rt_dir.parent, prefix=".tmp-"))
            for name in TARGETS[Target(target)]["support"]:
                (tmp / name).write_text(sources[name])
            os.rename(tmp, src)
        obj.parent.mkdir(exist_ok=True)
        r = _run_ninja([_ninja(), "-f", str(build_file)] + [str(t) for t in targets], log)
        if r.returncode != 0:
            raise BuildError(_explain(r.stdout + r.stderr, src, [], build_file))
        log(f"kernels: {runtime} (the executor){' and the precompiled header' if len(targets) > 1 else ''} built "
            f"into {rt_dir}, once for every model")


def _library(build_dir: Path, src_dir: Path, target: Target, sources: dict[str, str], spans: list[KernelSpan],
             log, reuse: bool = True, ninja_copy: Optional[Path] = None) -> Path:
    """The library of ``sources`` (the files of ``src_dir``): from the cache, or built by ninja in
    ``build_dir`` (writing its build.ninja, and the same text to ``ninja_copy``)."""
    tc = toolchain(target)
    key = content_key(sources, tc)
    rt_dir = runtime_dir(target, tc, sources)
    text = write_ninja(build_dir, target, tc, key, list(sources), rt_dir)
    if ninja_copy is not None:
        ninja_copy.write_text(text)

    def make() -> Path:
        return _ninja_build(build_dir, src_dir, text, spans, ninja_copy or build_dir / "build.ninja", log,
                            runtime=lambda build_file: _build_runtime(rt_dir, target, sources, build_file, log))
    return _cached(key, tc, make, log, reuse)


def _run_ninja(args: list[str], log) -> subprocess.CompletedProcess:
    """ninja, its "[k/n] ..." lines moving the reporter's bar as they come (ffc.progress; a plain
    log function: run to the end); stdout and stderr together in ``stdout``."""
    advance = getattr(log, "advance", None)
    if advance is None:
        r = subprocess.run(args, capture_output=True, text=True)
        return subprocess.CompletedProcess(args, r.returncode, r.stdout + r.stderr, "")
    lines, done = [], 0
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            lines.append(line)
            m = re.match(r"\[(\d+)/(\d+)\]", line)
            if m:
                advance(int(m.group(1)) - done, total=int(m.group(2)))
                done = int(m.group(1))
    return subprocess.CompletedProcess(args, proc.returncode, "".join(lines), "")


def _ninja_build(build_dir: Path, src_dir: Path, text: str, spans: list[KernelSpan], ninja_file: Path,
                 log, runtime=lambda build_file: None) -> Path:
    """Run ninja in ``build_dir`` on the sources in ``src_dir``: objects are kept there, so only
    what changed since the last build there is compiled (``runtime`` first provides the shared
    executor object). The library built."""
    with _locked(build_dir):
        (build_dir / "obj").mkdir(parents=True, exist_ok=True)
        _link_sources(build_dir, src_dir)
        (build_dir / "build.ninja").write_text(text)
        runtime(build_dir / "build.ninja")
        r = _run_ninja([_ninja(), "-f", str(build_dir / "build.ninja")], log)
        if r.returncode != 0:
            raise BuildError(_explain(r.stdout + r.stderr, src_dir, spans, ninja_file))
        mod = re.search(r"^module = (\S+)$", text, re.M).group(1)
        compiled = re.findall(r"^\[\d+/\d+\] (?:CXX|NVCC) \S*/src/(\S+)$", r.stdout, re.M)
        log(f"kernels: compiled {', '.join(compiled) if compiled else 'nothing new'}; linked {mod}")
        for old in build_dir.glob("ffc_kernels_*"):      # earlier builds' libraries
            if not old.name.startswith(mod + "."):
                old.unlink()
        return next(build_dir.glob(mod + ".*"))


def build(kernels_dir: Path, target: Target, spans: Optional[list[KernelSpan]] = None,
          log=lambda s: None, final: Optional[Path] = None, reuse: bool = True) -> Path:
    """Build ``kernels_dir/src`` (writing ``kernels_dir/build.ninja``) and copy the library into
    ``kernels_dir/lib``; return its path there. ``final``: where ``kernels_dir`` will be once
    its artifact is renamed into place (default: where it is). With ``reuse`` a library already
    built from the same sources, flags and compiler is taken from the cache; else ninja builds
    it in the artifact's build directory (builddir_for: only what changed since the last build
    there) and it is published to the cache. ``ffc build`` does not reuse: its first run builds
    every object there, later ones only what was edited."""
    target = Target(target)
    kernels_dir = Path(kernels_dir)
    src_dir = kernels_dir / "src"
    sources = {p.name: p.read_text() for p in sorted(src_dir.iterdir()) if p.is_file()}
    lib = _library(builddir_for(final or kernels_dir), src_dir, target, sources, spans or [], log, reuse,
                   ninja_copy=kernels_dir / "build.ninja")
    out = kernels_dir / "lib" / lib.name
    out.parent.mkdir(exist_ok=True)
    for old in out.parent.iterdir():
        if old.name != lib.name:
            old.unlink()
    if not out.exists():
        shutil.copy2(lib, out)
    if (kernels_dir / "plan.json").is_file():      # built by ffc here, for this plan: may be loaded with it
        vouch(out, kernels_dir / "plan.json")
    return out


def _cached(key: str, tc: dict, make, log, reuse: bool = True) -> Path:
    """The library of content ``key`` from the cache, made by ``make`` and published there
    (atomically: a concurrent load never sees half a file) when it is not there yet."""
    lib = knobs.cache_dir() / "kernels" / key / f"{module_name(key)}{tc['ext_suffix']}"
    with _locked(lib.parent):                  # one build per key at a time: the others then find it
        if reuse and lib.exists():
            log(f"kernels: cached build {key}")
            getattr(log, "note", lambda s: None)("kernel library from the cache")
            return lib
        built = make()
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=lib.parent, prefix=".tmp-")
        os.close(fd)
        shutil.copy2(built, tmp)
        os.replace(tmp, lib)
    return lib


def check_plan(art: Artifact, log=lambda s: None) -> None:
    """The artifact's plan must be what ffc lowers from its final IR with the recorded options:
    the kernels trust its offsets and sizes, so a crafted plan could make them read or write
    anywhere. A plan ffc wrote or checked on this machine is known by its digest; another is
    lowered again (well under a second) and, when equal, vouched for."""
    rel = art.kernels["plan"]
    path = art.path(rel)
    if trusted(path):
        return
    log(f"checking {rel} against {art.final_ir}")
    opts = art.manifest.get("options") or {}
    try:
        want = lower_module(art.read_module(), target=art.plan.target, prefill_tokens=int(opts["prefill_tokens"]),
                            max_batch=int(opts["max_batch"])).to_json()
        same = json.loads(path.read_text()) == want
    except ArtifactError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a crafted IR or option makes lowering raise
        raise ArtifactError(f"{rel} cannot be checked against {art.final_ir} ({type(e).__name__}: {e}); "
                            "recompile the artifact") from None
    if not same:
        raise ArtifactError(f"{rel} is not what ffc lowers from {art.final_ir} (edited, crafted, or written by "
                            "another ffc); recompile the artifact")
    vouch(path)


def library_for(art: Artifact, log=lambda s: None) -> Path:
    """A kernel library of ``art`` that loads in this process: the shipped one if ffc built
    that very file on this machine (kernel_library.trusted) and it loads; else one built into
    the cache from the sources ffc's templates generate from the artifact's plan (never from
    the artifact's own sources or binary: native code from elsewhere is not run). The artifact
    itself is not modified. This is the hook ``ffc.load`` gives the runtime."""
    check_plan(art, log)
    shipped = art.path(art.kernels["library"])
    if shipped.is_file() and trusted(shipped, art.path(art.kernels["plan"])):
        try:
            load_library(shipped)
            return shipped
        except ArtifactError as e:
            log(f"{e}; rebuilding from the plan")
    else:
        log(f"{art.kernels['library']} was not built by ffc here; building the kernels from the plan")
    sources, spans = render_sources(art.plan)
    key = hashlib.sha256(repr(sorted(sources.items())).encode()).hexdigest()[:24]
    src_dir = knobs.cache_dir() / "kernels" / "generated" / key
    if not src_dir.is_dir():                 # published whole: concurrent loads never see half of it
        src_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=src_dir.parent, prefix=".tmp-"))
        for name, text in sources.items():
            (tmp / name).write_text(text)
        try:
            os.rename(tmp, src_dir)
        except OSError:                      # another process published it first
            shutil.rmtree(tmp, ignore_errors=True)
    return _library(builddir_for(src_dir), src_dir, art.plan.target, sources, spans, log)
