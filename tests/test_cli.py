"""The command line on a real artifact: inspect, run, and --from-ir with an edited dump."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ffc


def ffc_cli(*args):
    r = subprocess.run([sys.executable, "-m", "ffc.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout


def ffc_here(*args):
    """The CLI in this process (no interpreter start-up: for commands that only read and write
    files); its SIGTERM handler undone after."""
    import signal
    from ffc.cli import main
    old = signal.getsignal(signal.SIGTERM)
    try:
        main([str(x) for x in args])
    finally:
        signal.signal(signal.SIGTERM, old)


def test_graph_pictures(smol_artifact, tmp_path):
    """`ffc inspect --graph`: the final decode graph as SVG (parses as XML) with one node per IR
    node of the layer it draws, coloured by the plan step's kernel family; --layers all draws
    every node; --graph --diff draws what a pass made."""
    import xml.etree.ElementTree as ET
    from ffc.ir import parse
    art = Path(smol_artifact)
    manifest = json.loads((art / "manifest.json").read_text())
    decode = parse((art / manifest["final_ir"]).read_text()).graphs["decode"]
    ffc_here("inspect", art, "--graph", "-o", tmp_path / "g.svg")
    nodes = [g for g in ET.parse(tmp_path / "g.svg").getroot().iter("{http://www.w3.org/2000/svg}g")
             if g.get("class") == "node"]
    layer0 = sorted(n.name for n in decode.nodes if n.origin.layer == 0)
    assert sorted(g.get("data-ir") for g in nodes if g.get("data-layer") == "0") == layer0
    assert not any(g.get("data-layer") not in (None, "0") for g in nodes)        # the other layers folded
    fills = {g.get("data-ir"): g.find("{http://www.w3.org/2000/svg}rect").get("fill") for g in nodes}
    attention = next(n.name for n in decode.nodes if n.op.value == "cached_attention")
    linear = next(n.name for n in decode.nodes if n.op.value == "linear" and n.origin.layer == 0)
    assert fills[attention] != fills[linear] and "#ffffff" not in (fills[attention], fills[linear])
    ffc_here("inspect", art, "--graph", "--layers", "all", "-o", tmp_path / "all.svg")
    drawn = [g for g in ET.parse(tmp_path / "all.svg").getroot().iter("{http://www.w3.org/2000/svg}g")
             if g.get("class") == "node"]
    assert len(drawn) == len(decode.nodes) + len(decode.inputs)
    ffc_here("inspect", art, "--graph", "--diff", "raise_glu", "fuse_gate_up", "--graph-name", "forward",
            "-o", tmp_path / "d.svg")
    new = [g.get("data-op") for g in ET.parse(tmp_path / "d.svg").getroot().iter("{http://www.w3.org/2000/svg}g")
           if g.get("data-added")]
    assert "linear" in new and "slice" in new        # the fused gate_up projection, and its halves
    with pytest.raises(SystemExit):                  # a decision's text (the search) is not a graph
        ffc_here("inspect", art, "--graph", "search_parallel_strategy", "-o", tmp_path / "x.svg")
    # the report: one page holding the passes, the same graph inline, the plan's fusion decisions
    from html.parser import HTMLParser
    ffc_here("inspect", art, "--report", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    tags: dict = {}
    parser = HTMLParser()
    parser.handle_starttag = lambda tag, attrs: tags.__setitem__(tag, tags.get(tag, 0) + 1)
    parser.feed(page)
    assert tags["svg"] == 1 and tags["table"] >= 2 and "fuse_gate_up" in page and "fused" in page
    assert page.count('class="node"') == len(layer0) + len(decode.inputs) + sum(n.origin.layer is None for n in decode.nodes)


def test_inspect(smol_artifact):
    out = ffc_cli("inspect", smol_artifact)
    for name in ("remove_noops", "raise_rope", "fuse_qkv", "insert_kv_cache", "max_seq_len"):
        assert name in out
    assert "cached_attention" in ffc_cli("inspect", smol_artifact, "--ir", "kv_cache")
    diff = ffc_cli("inspect", smol_artifact, "--diff", "raise_attention", "fuse_qkv")
    assert "+param @model.layers.0.self_attn.q_proj+k_proj+v_proj.weight" in diff


def test_run_prompt_and_chat(smol_artifact, smol_llm):
    out = ffc_cli("run", smol_artifact, "--prompt", "The capital of France is", "--max-new-tokens", "12")
    assert out.strip() == smol_llm.generate("The capital of France is", max_new_tokens=12).texts[0].strip()
    chat = ffc_cli("run", smol_artifact, "--chat", "Give me three tips for Tokyo", "--temperature", "0.7",
                   "--seed", "1", "--max-new-tokens", "16")
    assert chat.strip()


def test_compile_from_edited_ir(smol_artifact, tmp_path, smol_llm):
    src = sorted((smol_artifact / "ir").glob("*-eliminate_dead_code.ir"))[-1].read_text()   # the one before the search
    edited = tmp_path / "edited.ir"
    # an edit a user might make: a different epsilon in the final norm
    line = next(ln for ln in src.splitlines() if ln.endswith("# model.norm"))
    assert "eps=9.999999747378752e-06" in line
    edited.write_text(src.replace(line, line.replace("eps=9.999999747378752e-06", "eps=0.5")))
    art = ffc.compile("smollm2-135m", str(tmp_path / "e.ffc"), from_ir=str(edited), max_seq_len=512)
    llm = ffc.load(art)
    assert "eps=0.5" in (art / llm.manifest["final_ir"]).read_text()
    # `ffc debug compare` on that artifact checks what it runs: its edited IR and its kernels
    r = subprocess.run([sys.executable, "-m", "ffc.cli", "debug", "compare", str(art), "--prompt", "Hello there",
                        "--fail"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "artifact IR ir/" in r.stdout and "artifact kernels" in r.stdout and "<-- departs" in r.stdout
    assert "HF module: model.norm" in r.stdout and "eps=0.5" in r.stdout
    unedited = tmp_path / "same.ir"
    unedited.write_text(src)
    same = ffc.load(ffc.compile("smollm2-135m", str(tmp_path / "s.ffc"), from_ir=str(unedited), max_seq_len=512))
    p = "The capital of France is"
    assert same.generate(p, max_new_tokens=8).token_ids == smol_llm.generate(p, max_new_tokens=8).token_ids


def test_manifest_records_what_the_build_came_from(smol_artifact):
    """The manifest's provenance: the input file's SHA-256, the toolchain with versions, the
    profile's numbers, the workload and memory limit the search priced, the one-rank prediction."""
    import json
    from ffc import sources
    from ffc.artifact import sha256
    prov = json.loads((smol_artifact / "manifest.json").read_text())["provenance"]
    gguf = sources.resolve("smollm2-135m").gguf
    assert prov["inputs"][Path(gguf).name] == sha256(Path(gguf))
    assert "config.json (from the GGUF)" in prov["inputs"]
    tc = prov["toolchain"]
    assert tc["cxx_version"] and tc["march"] and tc["march"] != "native" and "-O3" in tc["cflags"]
    assert tc["ninja"] and tc["pybind11"]
    assert prov["profile"]["memory_bandwidth"] > 0 and prov["profile"]["peak_flops"]
    assert prov["search"]["workload"]["max_seq_len"] == 512 and prov["search"]["memory_limit_bytes"] > 0
    assert prov["search"]["predicted_one_rank"]["decode_s"] > 0


def test_bench_reads_the_plan(smol_artifact):
    """`ffc bench` end to end on a short setting (no baseline): every figure it derives from the
    plan (weights a decode step reads, the prefill GEMMs) comes out; speed is not asserted."""
    from ffc.bench import format_bench, run_bench
    res = run_bench(str(smol_artifact), compare="none", runs=1, new_tokens=4, batches=(1,), prefill_lens=(32,))
    assert res["weights_bytes_per_step"] > 100e6 and res["roofline_tok_s"] > 0
    assert res["gemm"] and all(g["kernel"].endswith("_linear") and g["ffc_ms"] > 0 for g in res["gemm"])
    text = format_bench(res)
    assert "decode batch 1" in text and res["gemm"][0]["kernel"] in text


def test_build_after_editing_a_source_and_not_after_corruption(smol_artifact, smol_llm, tmp_path):
    """`ffc build` rebuilds from edited sources and re-hashes what it wrote; a corrupted weights
    file is refused before anything is rebuilt or re-hashed."""
    import shutil
    art = tmp_path / "copy.ffc"
    shutil.copytree(smol_artifact, art)
    src = art / "kernels" / "src" / "norm.cpp"
    src.write_text("// edited by hand\n" + src.read_text())
    ffc_cli("build", art)
    prompt = "The capital of France is"
    assert ffc.load(art).generate(prompt, max_new_tokens=8).token_ids == \
        smol_llm.generate(prompt, max_new_tokens=8).token_ids
    w = art / "weights" / "rank0.safetensors"
    data = bytearray(w.read_bytes())
    data[-100] ^= 0xFF
    w.write_bytes(bytes(data))
    r = subprocess.run([sys.executable, "-m", "ffc.cli", "build", str(art)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2 and "weights/rank0.safetensors" in r.stderr and "corrupted" in r.stderr
    with pytest.raises(ffc.ArtifactError, match="weights/rank0.safetensors"):
        ffc.load(art)


@pytest.fixture(scope="module")
def tiny_art(tmp_path_factory, smol_source):
    from conftest import tiny_model_folder
    folder = tiny_model_folder(tmp_path_factory.mktemp("tiny") / "llama", "llama", smol_source)
    return ffc.compile(str(folder), str(folder.parent / "t.ffc"), max_seq_len=48)


def test_reporter_without_a_terminal(capsys):
    """Without a terminal a reporter prints one plain line per finished phase (with its notes)
    and nothing else: transformers' GGUF conversion loop (its own tqdm) runs silent while it is
    active and gets its tqdm back after; the summary lists nested phases under their parent."""
    from transformers import modeling_gguf_pytorch_utils as hf_gguf
    from ffc.progress import Reporter
    original = hf_gguf.tqdm
    with Reporter(live=False) as report:
        with report.phase("outer", total=3):
            assert list(hf_gguf.tqdm(range(4), desc="Converting and de-quantizing GGUF tensors...")) == [0, 1, 2, 3]
            with report.phase("inner"):
                report.note("cache hit")
            report.advance()
    assert hf_gguf.tqdm is original
    err = capsys.readouterr().err
    assert err.splitlines() == [line for line in err.splitlines() if line.startswith("[ffc] ")]
    assert "[ffc] inner: 0.0 s (cache hit)" in err and "\r" not in err
    rows = report.summary().splitlines()
    assert rows[1].startswith("outer") and rows[2].startswith("  inner") and rows[-1].startswith("compile total")


def test_run_a_batch_file(tiny_art, tmp_path):
    """`ffc run --batch-file`: every prompt through continuous batching, the results in input
    order and equal to generating each alone; progress lines (no control characters) without a
    terminal; a bad line is named before anything runs, and nothing is written."""
    prompts = [f"Story number {k}:" for k in range(40)]
    lines = [json.dumps({"prompt": p, "id": f"p{k}"}) for k, p in enumerate(prompts)]
    lines.insert(7, json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 3, "id": "chat"}))
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    r = subprocess.run([sys.executable, "-m", "ffc.cli", "run", str(tiny_art), "--batch-file", str(tmp_path / "p.jsonl"),
                        "--output", str(tmp_path / "o.jsonl"), "--max-new-tokens", "8", "--ignore-eos"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [o["id"] for o in out] == [f"p{k}" for k in range(7)] + ["chat"] + [f"p{k}" for k in range(7, 40)]
    assert out[7]["tokens"] == 3 and all(o["tokens"] == 8 for o in out if o["id"] != "chat")
    llm = ffc.load(tiny_art)
    assert [o["text"] for o in out[:3]] == llm.generate(prompts[:3], max_new_tokens=8, ignore_eos=True).texts
    assert r.stderr.count("prompts, ") >= 10 and not {c for c in r.stderr if ord(c) < 32 and c != "\n"}
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    r = subprocess.run([sys.executable, "-m", "ffc.cli", "run", str(tiny_art), "--batch-file", str(tmp_path / "bad.jsonl"),
                        "--output", str(tmp_path / "bad-out.jsonl")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "bad.jsonl:2: not JSON" in r.stderr and not (tmp_path / "bad-out.jsonl").exists()


def test_build_ninja_builds_the_artifact_and_an_edit_rebuilds_one_object(tiny_art):
    """A fresh artifact's kernels/build.ninja reads the artifact's own sources (not the compile's
    temporary directory) and runs from any directory; after one source is edited, `ffc build`
    compiles that source's object only (and the one-line entry point named after the build)."""
    import shutil
    from ffc import build
    nf = tiny_art / "kernels" / "build.ninja"
    assert ".tmp-" not in nf.read_text()
    r = subprocess.run([build._ninja(), "-f", str(nf)], cwd=Path(nf.anchor), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    prompt = "The capital of France is"
    want = ffc.load(tiny_art).generate(prompt, max_new_tokens=6).token_ids
    copy = tiny_art.parent / "moved.ffc"       # a moved artifact builds in its own place
    shutil.copytree(tiny_art, copy)
    ffc_cli("build", copy)
    objs = build.builddir_for(copy / "kernels") / "obj"
    before = {p.name: p.stat().st_mtime_ns for p in objs.glob("*.o")}
    assert {"norm.cpp.o", "linear.cpp.o"} <= set(before) and "executor.cpp.o" not in before
    # the executor is compiled once for every model, in the runtime directory the build file names
    runtime = Path(re.search(r"^rtdir = (.+)$", nf.read_text(), re.M).group(1)) / "obj" / "executor.cpp.o"
    runtime_mtime = runtime.stat().st_mtime_ns
    src = copy / "kernels" / "src" / "norm.cpp"
    src.write_text("// edited by hand\n" + src.read_text())
    r = subprocess.run([sys.executable, "-m", "ffc.cli", "build", str(copy)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert "compiled norm.cpp;" in r.stderr
    after = {p.name: p.stat().st_mtime_ns for p in objs.glob("*.o")}
    assert {n for n in before if after[n] != before[n]} == {"norm.cpp.o", "module_init.o"}
    assert runtime.stat().st_mtime_ns == runtime_mtime
    assert ffc.load(copy).generate(prompt, max_new_tokens=6).token_ids == want


def test_bench_on_a_short_artifact(tiny_art):
    """`ffc bench` with its default sizes on an artifact of max_seq_len 48: prompts, new tokens
    and batches come from the artifact's limits (the fixed 128-token prompt once failed here)."""
    out = ffc_cli("bench", tiny_art, "--compare", "none", "--runs", "1")
    assert "decode batch 32" in out and "time to first token" in out


def test_every_option_has_help_and_is_in_the_readme():
    """Every option of every subcommand has help text, and the README's option reference is the
    parser's (regenerate it with `python -m ffc.cli_args`)."""
    from ffc.cli_args import _subcommands, build_parser, options_markdown
    missing = [f"{cmd} {'/'.join(a.option_strings) or a.dest}" for cmd, p in _subcommands(build_parser())
               for a in p._actions if not a.help]
    assert not missing, missing
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert options_markdown() in readme, "README's option reference is stale: python -m ffc.cli_args"


@pytest.mark.parametrize("args,msg", [
    (["compile", "smollm2-135m", "--memory-per-device", "abc", "-o", "x.ffc"], "argument --memory-per-device: 'abc'"),
    (["serve", "x.ffc", "--kv-cache-memory", "lots"], "argument --kv-cache-memory: 'lots' is not a size"),
    (["serve", "x.ffc", "--port", "70000"], "argument --port: 70000 is out of range"),
    (["run", "x.ffc", "--max-new-tokens", "0"], "argument --max-new-tokens: 0 must be >= 1"),
    (["bench", "x.ffc", "--batch", "8", "-2"], "argument --batch: -2 must be >= 1"),
    (["run", "x.ffc", "--temperature", "hot"], "argument --temperature: 'hot' is not a number"),
])
def test_bad_option_values_name_the_option(args, msg):
    r = subprocess.run([sys.executable, "-m", "ffc.cli", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and msg in r.stderr, r.stderr


def test_help_and_argument_errors_import_no_torch():
    """`ffc --help` and a mistyped argument answer without importing torch (the names they offer
    come from ffc.choices); the weight formats named there are the IR's."""
    code = ("import sys\nfrom ffc.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    for args in (["--help"], ["compile", "m", "-o", "x", "--quant", "q3"]):
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
        assert r.stdout.strip().endswith("False"), (args, r.stdout[-200:], r.stderr[-500:])
    assert "invalid choice: 'q3'" in r.stderr
    from ffc.choices import QUANT_MODES
    from ffc.ir.quant import QUANT_CHOICES
    assert QUANT_MODES == ("none", "gguf", *QUANT_CHOICES)
