"""The CUDA path without a CUDA build of torch: the kernel library owns its device memory.

Its host half (weights, arena and KV cache as executor allocations: copies in and out, KV slot
moves, a host cache staged and written back) runs here on the CPU executor's twin of it
(FFC_OWN_MEMORY=1); the CUDA library is built with nvcc, checked to need only the driver, and
refused with a clear message where the driver is missing (a fake libcuda.so.1 makes that so
on a GPU machine too). The kernels themselves run where a GPU and its driver are.
"""
import ctypes
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ffc import build
from ffc.codegen import render_sources
from ffc.errors import ArtifactError
from ffc.ir import run_graph
from ffc.lower import lower_module
from ffc.plan.schema import Target
from ffc.runtime.compiled import CompiledPlan
from ffc.runtime.device_memory import HUGE_PAGE, SLAB_MIN, DeviceArray, OwnMemory, copy_kv_slots, host_buffer

from conftest import PROMPTS
from test_codegen import _inputs, kernel_lib  # noqa: F401 - the CPU kernels of the same IR

NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
GRAPHS = ("lin", "narrow", "tied", "norm", "pw", "attn", "moe", "moe16")


def gpu_arch() -> str:
    """The first GPU's SM version through the driver ("" without a driver or a GPU)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return ""
    n, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(n)) != 0 or n.value == 0:
        return ""
    if cuda.cuDeviceComputeCapability(ctypes.byref(major), ctypes.byref(minor), 0) != 0:
        return ""
    return f"{major.value}{minor.value}"


GPU = pytest.mark.skipif(not gpu_arch() or NVCC is None, reason="needs a GPU, its driver and nvcc")


@pytest.fixture(scope="module")
def cuda_build(kernel_lib, tmp_path_factory):  # noqa: F811
    """The kernel IR lowered for CUDA and built with nvcc (for this machine's GPU, else sm_80)."""
    if NVCC is None:
        pytest.skip("nvcc is not installed")
    module, _, _, weights, _, _ = kernel_lib
    plan = lower_module(module, target="cuda", prefill_tokens=40, max_batch=8)
    kdir = tmp_path_factory.mktemp("cuda")
    (kdir / "src").mkdir()
    sources, spans = render_sources(plan)
    for name, text in sources.items():
        (kdir / "src" / name).write_text(text)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FFC_CUDA_ARCHS", gpu_arch() or "80")
        mp.setenv("PATH", f"{Path(NVCC).parent}:{os.environ['PATH']}")
        lib = build.build(kdir, "cuda", spans)
    return module, plan, lib, weights, sources, kdir


def test_cuda_library_builds_and_needs_only_the_driver(cuda_build):
    """Every kernel family emitted as .cu builds with nvcc into a library that links the CUDA
    runtime in: it names neither libcudart nor libcuda nor torch, so a machine with a GPU and
    its driver loads it (the runtime opens the driver when first called)."""
    _, _, lib, _, sources, kdir = cuda_build
    assert {"linear.cu", "norm.cu", "attention.cu", "gather.cu", "pointwise.cu", "moe.cu", "table.cu",
            "executor_cuda.cu", "ffc_cuda.h"} <= set(sources)
    assert "ffc_warp_sum" in sources["linear.cu"] and "_gemm<<<" in sources["linear.cu"]
    assert lib.exists() and "nvcc" in (kdir / "build.ninja").read_text()
    if shutil.which("readelf") is None:
        pytest.skip("readelf is not installed")
    dynamic = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[")[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert needed and not [n for n in needed if n.startswith(("libcudart", "libcuda.", "libtorch", "libc10"))], needed


SCRIPT = """
import sys, torch
from ffc.errors import ArtifactError
from ffc.runtime.compiled import CompiledPlan
from ffc.runtime.kernel_library import load_library
saved = torch.load(sys.argv[1], weights_only=False)
try:
    CompiledPlan(saved["plan"], load_library(sys.argv[2]), saved["weights"])
except ArtifactError as e:
    print(e)
    sys.exit(3)
"""


def test_cuda_plan_without_a_driver_says_so(cuda_build, tmp_path):
    """A driver that cannot be loaded (a stand-in libcuda.so.1 with nothing in it, found first)
    is an ArtifactError that says so and what to do, from the library's own CUDA runtime."""
    _, plan, lib, weights, _, _ = cuda_build
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the stand-in driver")
    fake = tmp_path / "driver"
    fake.mkdir()
    (fake / "empty.c").write_text("int ffc_not_a_driver;\n")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(fake / "libcuda.so.1"), str(fake / "empty.c")], check=True)
    torch.save({"plan": plan, "weights": weights}, tmp_path / "plan.pt")
    env = dict(os.environ, LD_LIBRARY_PATH=f"{fake}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "plan.pt"), str(lib)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr[-2000:]
    msg = r.stdout.strip()
    assert "\n" not in msg and "the plan is for CUDA, but this process cannot run it: no CUDA driver" in msg, msg
    assert "install the NVIDIA driver" in msg and "--target cpu" in msg


@pytest.mark.skipif(bool(gpu_arch()), reason="checks the message of a machine without a GPU driver")
def test_cuda_plan_on_this_machine_says_so(cuda_build):
    """In process too: no driver here, so the plan is refused before anything is allocated."""
    _, plan, lib, weights, _, _ = cuda_build
    with pytest.raises(ArtifactError, match="plan is for CUDA, but this process cannot run it: no CUDA driver"):
        CompiledPlan(plan, build.load_library(lib), weights)


def test_cuda_plan_with_collectives_needs_a_cuda_torch(cuda_build, monkeypatch):
    """NCCL comes from torch: a tensor-parallel CUDA plan without a CUDA torch is refused by name."""
    from ffc.runtime import compiled
    _, plan, lib, weights, _, _ = cuda_build
    tp = replace(plan, graphs={**plan.graphs, "lin": replace(plan.graphs["lin"], steps=plan.graphs["lin"].steps + (
        replace(plan.graphs["lin"].steps[0], kernel=None),))})
    mod = build.load_library(lib)

    class Driver:       # the library, with a driver that sees one GPU
        def __getattr__(self, name):
            return getattr(mod, name)

        @staticmethod
        def device_check(ordinal):
            return ""
    monkeypatch.setattr(compiled.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ArtifactError, match="NCCL, which needs a CUDA build of torch"):
        CompiledPlan(tp, Driver(), weights)


def test_own_memory_runs_what_torch_memory_runs(kernel_lib, monkeypatch):  # noqa: F811
    """FFC_OWN_MEMORY=1: weights, arena and cache are the executor's allocations (the CUDA path's
    host half); every graph gives the same bits as the torch-memory plan, with the KV cache as an
    executor array or as a host tensor (staged in, written back)."""
    module, plan, cp, weights, _, _ = kernel_lib
    monkeypatch.setenv("FFC_OWN_MEMORY", "1")
    own = CompiledPlan(plan, cp.lib, weights, threads=2)
    assert isinstance(own.memory, OwnMemory) and all(isinstance(w, DeviceArray) for w in own.weights.values())
    assert all(isinstance(w, DeviceArray) for w in own.packed.values()) and own.packed
    for graph in GRAPHS:
        for T in (1, 9, 31):
            inputs = _inputs(graph, T)
            host = {k: v.clone() for k, v in inputs.items()}
            want = cp.run(graph, host)
            got = own.run(graph, inputs)
            assert all(torch.equal(g, w) for g, w in zip(got, want)), (graph, T)
            if "kv_cache" in inputs:
                assert torch.equal(inputs["kv_cache"], host["kv_cache"])          # written back
                again = {k: v.clone() for k, v in _inputs(graph, T).items()}
                dev = own.memory.to_device(again.pop("kv_cache"))
                got = own.run(graph, dict(again, kv_cache=dev))
                assert all(torch.equal(g, w) for g, w in zip(got, want))
                assert torch.equal(dev.cpu(), host["kv_cache"])
    with pytest.raises(Exception, match="KV cache is DeviceArray on cpu; the plan runs on HostMemory"):
        cp.run("attn", dict(_inputs("attn", 3), kv_cache=own.memory.to_device(_inputs("attn", 3)["kv_cache"])))


@pytest.mark.parametrize("dtype,row", [(torch.float32, 6), (torch.int8, 12)])
def test_kv_slot_moves_in_executor_memory(kernel_lib, dtype, row):  # noqa: F811
    """Accepted tree tokens' K/V moved slot to slot (chained moves, in order) inside executor
    memory as torch indexing moves them; a copy outside the array is refused."""
    _, _, cp, _, _, _ = kernel_lib
    mem = OwnMemory(cp.exe, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    cache = torch.randint(-100, 100, (3, 2, 5, 2, 4, row), generator=g).to(dtype)
    dev = mem.to_device(cache)
    blocks, moves = [4, 1, 3], [(5, 2), (2, 9), (11, 0), (0, 11)]
    copy_kv_slots(cache, blocks, moves)
    copy_kv_slots(dev, blocks, moves)
    assert torch.equal(dev.cpu(), cache)
    with pytest.raises(ValueError, match="outside DeviceArray"):
        dev.write(dev.nbytes - 2, torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="outside DeviceArray"):
        dev.read(-1, torch.uint8, (2,))


def test_own_memory_generates_what_the_default_does(smol_artifact, smol_llm, monkeypatch):
    """The default model end to end on executor memory (KV pool included), plain and with
    prompt-lookup speculation (verify trees and KV slot moves): the same tokens."""
    import ffc
    monkeypatch.setenv("FFC_OWN_MEMORY", "1")
    llm = ffc.load(smol_artifact)
    assert isinstance(llm.engine.pool.tensor, DeviceArray)
    want = smol_llm.generate(PROMPTS, max_new_tokens=24).token_ids
    assert llm.generate(PROMPTS, max_new_tokens=24).token_ids == want
    assert llm.generate(PROMPTS, max_new_tokens=24, speculative="ngram").token_ids == want


def test_huge_pages_hold_the_weights_and_change_no_token(smol_artifact, smol_llm, monkeypatch):
    """Weights of 256 KiB and more (packed panels, tables) are carved one after another from
    mappings with huge pages asked for, the first at a 2 MiB boundary; FFC_HUGE_PAGES=0 leaves
    them to torch's allocator, and the default model writes the same tokens either way."""
    import ffc
    buf = host_buffer(3 * HUGE_PAGE + 5)
    assert buf.numel() == 3 * HUGE_PAGE + 5 and buf.data_ptr() % HUGE_PAGE == 0 and not buf.any()
    big = [t for t in smol_llm.compiled.packed.values() if t.numel() * t.element_size() >= SLAB_MIN]
    assert big and not any(t.untyped_storage().resizable() for t in big)      # mapped, not torch's
    assert any(t.data_ptr() % HUGE_PAGE == 0 for t in big) and all(t.data_ptr() % 4096 == 0 for t in big)
    monkeypatch.setenv("FFC_HUGE_PAGES", "0")
    assert host_buffer(3 * HUGE_PAGE).untyped_storage().resizable()
    llm = ffc.load(smol_artifact)
    assert all(t.untyped_storage().resizable() for t in llm.compiled.packed.values())
    assert llm.generate(PROMPTS, max_new_tokens=24).token_ids == smol_llm.generate(PROMPTS, max_new_tokens=24).token_ids


@GPU
def test_cuda_kernels_match_interpreter(cuda_build):
    """Every generated CUDA kernel on the GPU against the interpreter on the CPU (the same plan),
    from the CPU build of torch: the library owns the device memory."""
    module, plan, lib, weights, _, _ = cuda_build
    cp = CompiledPlan(plan, build.load_library(lib), weights)
    assert cp.device.type == "cuda" and isinstance(cp._arena, DeviceArray) and cp._arena.is_cuda
    for graph in GRAPHS:
        for T in (1, 3, 9, 31):
            inputs = _inputs(graph, T)
            ref_inputs = {k: v.clone() for k, v in inputs.items()}
            ref = run_graph(module.graphs[graph], weights, ref_inputs)
            tol = dict(atol=1e-3, rtol=1.6e-2) if graph in ("narrow", "moe16") else dict(atol=1e-4, rtol=1e-4)
            for g, r in zip(cp.run(graph, inputs), ref):
                torch.testing.assert_close(g, r, **tol)
            if graph == "attn":     # a host cache: staged on the GPU and written back
                torch.testing.assert_close(inputs["kv_cache"], ref_inputs["kv_cache"], **tol)


@GPU
def test_cuda_artifact_generates_what_the_cpu_one_does(smol_llm, tmp_path):
    import ffc
    art = ffc.compile("smollm2-135m", str(tmp_path / "smol-cuda.ffc"), max_seq_len=512, target="cuda")
    llm = ffc.load(art)
    assert llm.compiled.device.type == "cuda" and llm.engine.pool.tensor.is_cuda
    want = smol_llm.generate(PROMPTS, max_new_tokens=32).token_ids
    assert llm.generate(PROMPTS, max_new_tokens=32).token_ids == want
    assert llm.generate(PROMPTS, max_new_tokens=32, speculative="ngram").token_ids == want


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of torch's CPU build")
def test_cuda_ranks_without_a_cuda_torch_are_refused_before_they_start():
    """Several ranks of a CUDA artifact need NCCL: refused by name (and what to do) before any
    rank process starts, rather than failing inside init_process_group."""
    from types import SimpleNamespace
    from ffc.runtime.distributed import collective_backend
    art = SimpleNamespace(root="m.ffc", target="cuda", tp=2, pp=1)
    with pytest.raises(ArtifactError, match=r"m.ffc runs CUDA kernels on 2 ranks.*NCCL.*--tp 1 --pp 1"):
        collective_backend(art, None)
    assert collective_backend(art, "interpreter") == "gloo"
    assert collective_backend(SimpleNamespace(**{**vars(art), "target": "cpu"}), None) == "gloo"
