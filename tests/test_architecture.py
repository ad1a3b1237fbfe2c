"""The code's shape, asserted: layers import one way, no hidden imports, small modules, a plan
that round-trips as typed data, expressions rendered by codegen, options that hash what they
change."""
import ast
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ffc.codegen import c_expr
from ffc.ir.strategy import Workload
from ffc.ir.types import DType
from ffc.options import CompileOptions
from ffc.plan import expr as ex
from ffc.plan.codec import PlanFormatError
from ffc.plan.schema import ArgKind, Plan

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("compiler", "ir", "passes", "runtime")

# Imports a function may make: optional or heavy dependencies a module must not pay for at
# import time, and the two entry points of `ffc/__init__` (so `import ffc.runtime` stays light).
ALLOWED_LOCAL_IMPORTS = {
    "transformers",          # loading a model / tokenizer: only when compiling or chatting
    "huggingface_hub",       # resolving a model id in the local HF cache
    "uvicorn",               # `ffc serve`
    "prometheus_client",     # the server's /metrics
    "prometheus_client.core",
}
ALLOWED_ENTRY_POINT_IMPORTS = {("compiler/__init__.py", ".api"), ("compiler/__init__.py", ".build"),
                               ("compiler/__init__.py", ".offload_policy"), ("compiler/__init__.py", ".artifact"),
                               ("compiler/__init__.py", "ffc.runtime.llm")}


def _sources():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def test_runtime_imports_no_compiler():
    code = ("import sys, ffc.runtime, ffc.runtime.llm, ffc.runtime.compiled, ffc.runtime.distributed, "
            "ffc.runtime.server, ffc.runtime.engine\n"
            "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('ffc'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = set(out.stdout.split())
    assert "ffc.runtime.compiled" in loaded and "ffc.plan.schema" in loaded
    for forbidden in ("ffc.lower", "ffc.api", "ffc.search", "ffc.build", "ffc.codegen", "ffc.passes",
                      "ffc.frontend"):
        assert not {m for m in loaded if m == forbidden or m.startswith(forbidden + ".")}, forbidden


def test_no_imports_inside_functions():
    found = []
    for path in _sources():
        rel = str(path.relative_to(ROOT))

        def walk(node, in_function):
            for child in ast.iter_child_nodes(node):
                if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                    names = ([a.name for a in child.names] if isinstance(child, ast.Import)
                             else ["." * child.level + (child.module or "")])
                    for name in names:
                        if name not in ALLOWED_LOCAL_IMPORTS and (rel, name) not in ALLOWED_ENTRY_POINT_IMPORTS:
                            found.append(f"{rel}:{child.lineno} imports {name}")
                walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
        walk(ast.parse(path.read_text()), False)
    assert not found, "\n".join(found)


def test_modules_and_classes_are_small():
    big = []
    for path in _sources():
        text = path.read_text()
        lines = text.count("\n") + 1
        if lines > 500:
            big.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 250:
                big.append(f"{path.relative_to(ROOT)}: class {node.name} {node.end_lineno - node.lineno + 1} lines")
    assert not big, "\n".join(big)


def test_options_hash_covers_the_search_inputs():
    base = CompileOptions(max_seq_len=256, tp=2)
    assert base.digest() == CompileOptions(max_seq_len=256, tp=2).digest()
    changed = [CompileOptions(max_seq_len=256, tp=2, profile="a100-nvlink"),
               CompileOptions(max_seq_len=256, tp=2, memory_per_device=8 << 30),
               CompileOptions(max_seq_len=256, tp=2, workload=Workload(batch=32)),
               CompileOptions(max_seq_len=256, tp=2, workload=Workload(kv_dtype="bf16"))]
    digests = {base.digest()} | {o.digest() for o in changed}
    assert len(digests) == 1 + len(changed)
    # the manifest form names them
    d = changed[2].to_dict()
    assert d["profile"] == "local" and d["workload"]["batch"] == 32 and d["dtype"] == "f32"
    json.dumps(d)


def test_expressions_render_to_c_and_evaluate():
    t, i0, i1 = ex.var("T"), ex.var("i0"), ex.var("i1")
    size = t * 576
    assert c_expr(size) == "(T * 576)" and size.evaluate({"T": 3}) == 1728
    assert c_expr(ex.from_dim("2*T+1")) == "((2 * T) + 1)"
    assert (ex.const(3) * 4 + 1).arg == 13        # integer constants fold
    body = ex.call(ex.Fn.SILU, ex.load(0, i0 * 7 + i1, DType.BF16)) * ex.load(1, i1, DType.F32)
    assert c_expr(body) == "(ffc_silu(ffc_to_f32(in0[((i0 * 7) + i1)])) * in1[i1])"
    assert c_expr(ex.cast(DType.F32, ex.const(-1.5))) == "((float)((-1.5f)))"
    assert ex.from_json(ex.to_json(body)) == body
    # only the kernel ABI's names: a plan cannot smuggle C text in through a variable
    for bad in ("x); system(\"rm\"", "foo", ["call", "system", 1], ["load", 0], ["nope", 1, 2]):
        with pytest.raises(ValueError):
            ex.from_json(bad)


def test_plan_round_trips_and_names_bad_fields(smol_artifact):
    data = json.loads((smol_artifact / "kernels" / "plan.json").read_text())
    plan = Plan.from_json(data)
    assert plan.to_json() == data
    step = plan.graphs["decode"].steps[0]
    assert all(isinstance(a.kind, ArgKind) for a in step.args)

    bad = copy.deepcopy(data)
    bad["graphs"]["decode"]["steps"][3]["args"][0]["kind"] = "pointer"
    with pytest.raises(PlanFormatError, match=r"graphs\.decode\.steps\[3\]\.args\[0\]\.kind"):
        Plan.from_json(bad)
    bad = copy.deepcopy(data)
    name = next(iter(bad["kernels"]))
    bad["kernels"]["k0); evil(); void x("] = bad["kernels"].pop(name)
    with pytest.raises(PlanFormatError, match="kernel name"):
        Plan.from_json(bad)
    with pytest.raises(PlanFormatError, match="recompile"):
        Plan.from_json({**data, "version": 1})
