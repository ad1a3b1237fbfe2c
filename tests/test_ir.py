"""IR: text round trip, verifier, interpreter, parse errors."""
import pytest
import torch

from ffc.ir import Op, REGISTRY, materialize_params, parse, print_module, run_graph, verify_module
from ffc.ir.text import IRParseError
from ffc.ir.verify import VerifyError

TEXT = """# ffc ir 1
param @w : f32[8,4]
param @b : f32[8]
param @wt : f32[4,8] = transpose(@w) {dim0=0, dim1=1}

graph forward(%x : f32[1,T,4]) {
  %0 = linear(%x, @w, @b) : f32[1,T,8]  # model.proj
  %1 = silu(%0) : f32[1,T,8]  # model.act
  %2 = reshape(%1) {shape=[1,"T",2,4]} : f32[1,T,2,4]  # model
  %3 = add(%2, 1e-05) : f32[1,T,2,4]
  return %3
}
"""


def test_print_parse_print_is_identical():
    m = parse(TEXT)
    assert print_module(m) == TEXT
    verify_module(m)


def test_every_op_has_a_registry_entry():
    assert all(op in REGISTRY for op in Op if op is not Op.INPUT)


def test_interpreter_and_recipes():
    m = parse(TEXT)
    w, b = torch.randn(8, 4), torch.randn(8)
    params = materialize_params(m.params, {"w": w, "b": b})
    assert torch.equal(params["wt"], w.t())
    x = torch.randn(1, 5, 4)
    out, = run_graph(m.graphs["forward"], params, {"x": x})
    ref = (torch.nn.functional.silu(x @ w.t() + b)).reshape(1, 5, 2, 4) + 1e-5
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1.3e-6)


def test_verifier_catches_wrong_type():
    bad = TEXT.replace("%1 = silu(%0) : f32[1,T,8]", "%1 = silu(%0) : f32[1,T,9]")
    with pytest.raises(VerifyError, match=r"declared type f32\[1,T,9\]"):
        verify_module(parse(bad))


def test_verifier_catches_symbolic_mistake():
    # right for one sequence length only: caught because the verifier binds T twice
    bad = TEXT.replace('{shape=[1,"T",2,4]} : f32[1,T,2,4]', '{shape=[1,"T",2,4]} : f32[1,5,2,4]')
    with pytest.raises(VerifyError, match="declared type"):
        verify_module(parse(bad))


def test_verifier_catches_unknown_param():
    with pytest.raises(VerifyError, match="unknown parameter @nope"):
        verify_module(parse(TEXT.replace("linear(%x, @w, @b)", "linear(%x, @nope, @b)")))


def test_parse_errors_name_the_line():
    with pytest.raises(IRParseError, match="line 8.*used before it is defined"):
        parse(TEXT.replace("silu(%0)", "silu(%7)"))
    with pytest.raises(IRParseError, match="unknown op 'frobnicate'"):
        parse(TEXT.replace("silu(%0)", "frobnicate(%0)"))
    with pytest.raises(IRParseError, match="defined twice"):
        parse(TEXT.replace("%2 = reshape", "%1 = reshape").replace("add(%2,", "add(%1,"))
