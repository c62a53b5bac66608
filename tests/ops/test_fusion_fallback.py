"""The torch.compile fallback: eager math only where the machine cannot compile; genuine bugs propagate.

``torch.compile`` is replaced by a function returning a kernel that raises the given error; the
result of the fused path is compared with the eager math (the same functions, never compiled).
"""

import logging

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed
from torch._inductor import exc as inductor_exc
from transformers import activations as A

from hf_dreg.ops import formulas, functions, kernels
from hf_dreg.ops.activations import spec_for
from hf_dreg.ops.kernels import KERNELS

_PHRASE = "fused DREG kernels unavailable"


def _no_compiler():
    return inductor_exc.InvalidCxxCompiler()


def _cpp_compile_error():
    return inductor_exc.CppCompileError(["g++", "kernel.cpp"], "fatal error: Python.h: No such file or directory")


def _wrapped_cxx():
    return BackendCompilerFailed(lambda gm, inputs: None, inductor_exc.InvalidCxxCompiler(), None)


def _inductor_cpp():
    return inductor_exc.InductorError(_cpp_compile_error(), None)


def _triton_missing():
    return BackendCompilerFailed(lambda gm, inputs: None, inductor_exc.TritonMissing(None), None)


def _cause_chain():
    try:
        try:
            raise inductor_exc.InvalidCxxCompiler()  # torch 2.11 takes no argument, 2.13 an optional one
        except inductor_exc.InvalidCxxCompiler as inner:
            raise RuntimeError("compiling the kernel failed") from inner
    except RuntimeError as outer:
        return outer


def _shape_bug():
    return RuntimeError("shape mismatch")


def _wrapped_bug():
    return BackendCompilerFailed(lambda gm, inputs: None, RuntimeError("shape mismatch"), None)


def _implicit_context():
    """A bug raised while handling a compiler error is still a bug (only explicit causes count)."""
    try:
        try:
            raise inductor_exc.InvalidCxxCompiler()
        except inductor_exc.InvalidCxxCompiler:
            raise RuntimeError("shape mismatch")
    except RuntimeError as error:
        return error


@pytest.fixture
def failing_compile(monkeypatch):
    """Fresh fusion state; torch.compile returns kernels raising what ``set_error`` chose."""
    monkeypatch.setattr(KERNELS, "compiled", {})
    monkeypatch.setattr(KERNELS, "failed", False)
    state = {"error": None, "calls": 0}

    def fake_compile(fn, **kwargs):
        def kernel(*args):
            state["calls"] += 1
            raise state["error"]()

        return kernel

    monkeypatch.setattr(torch, "compile", fake_compile)
    return state


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 3, 6, generator=g, requires_grad=True)
    u = torch.randn(2, 3, 6, generator=g, requires_grad=True)
    w = torch.randn(6, 4, generator=g, requires_grad=True)
    v = torch.randn(6, 4, generator=g, requires_grad=True)
    return z, u, w, v


def _gated(module, fused, seed=0):
    spec = spec_for(module)
    z, u, w, v = _data(seed)
    p = functions.gated_site_penalty(z, module(z), u, functions.row_stats(w), functions.row_stats(v), functions.row_dots(w, v), spec, fused=fused)
    grads = torch.autograd.grad(p.sum(), (z, u, w, v))
    return p.detach(), grads


@pytest.mark.parametrize(
    "error,name",
    [
        (_no_compiler, "InvalidCxxCompiler"),
        (_cpp_compile_error, "CppCompileError"),
        (_wrapped_cxx, "InvalidCxxCompiler"),
        (_inductor_cpp, "CppCompileError"),
        (_triton_missing, "TritonMissing"),
        (_cause_chain, "InvalidCxxCompiler"),
    ],
)
def test_no_compiler_falls_back_to_eager_math_and_says_so_once(failing_compile, caplog, error, name):
    failing_compile["error"] = error
    module = A.GELUActivation()
    with caplog.at_level(logging.WARNING):
        p, grads = _gated(module, fused=True)
        assert KERNELS.failed
        calls = failing_compile["calls"]
        assert calls == 1  # the first kernel tried, then eager for the process
        p2, _ = _gated(A.SiLUActivation(), fused=True, seed=1)  # another activation: eager at once
        assert failing_compile["calls"] == calls
    expected_p, expected_grads = _gated(module, fused=False)
    assert torch.equal(p, expected_p)
    for a, b in zip(grads, expected_grads):
        assert torch.equal(a, b)
    assert torch.equal(p2, _gated(A.SiLUActivation(), fused=False, seed=1)[0])
    records = [r for r in caplog.records if _PHRASE in r.getMessage()]
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    assert records[0].levelno == logging.WARNING and records[0].name == "hf_dreg.ops.kernels"
    assert name in records[0].getMessage()


@pytest.mark.parametrize("error", [_shape_bug, _wrapped_bug, _implicit_context])
def test_a_genuine_error_of_the_compiled_kernel_propagates(failing_compile, caplog, error):
    failing_compile["error"] = error
    with caplog.at_level(logging.WARNING):
        with pytest.raises((RuntimeError, BackendCompilerFailed), match="shape mismatch"):
            _gated(A.GELUActivation(), fused=True)
        z, _, w, _ = _data()
        spec = spec_for(A.GELUActivation())
        with pytest.raises((RuntimeError, BackendCompilerFailed), match="shape mismatch"):
            functions.plain_site_penalty(z, A.GELUActivation()(z), functions.row_stats(w), spec, fused=True)
    assert not KERNELS.failed  # fusion stays on for the next call
    assert not [r for r in caplog.records if _PHRASE in r.getMessage()]


def test_missing_compiler_classifies_by_type_not_message():
    assert kernels.missing_compiler(_no_compiler()) is not None
    assert kernels.missing_compiler(RuntimeError("No working C++ compiler found")) is None
    assert kernels.missing_compiler(_implicit_context()) is None
    assert isinstance(kernels.missing_compiler(_triton_missing()), inductor_exc.TritonMissing)


# ---- a whole site that this torch cannot trace as one region -------------------------------------

_WHOLE = "cannot compile a whole DREG site"


@pytest.fixture
def untraceable(monkeypatch):
    """torch.compile of the regions named in the returned ``fail`` list fails as torch 2.11's dynamo does
    (an AssertionError while tracing an autograd Function that returns its input); the rest compile."""
    monkeypatch.setattr(KERNELS, "compiled", {})
    monkeypatch.setattr(KERNELS, "failed", False)
    monkeypatch.setattr(KERNELS, "untraceable", set())
    real_compile = torch.compile
    state = {"fail": [], "tried": []}

    def compile_(fn, **kwargs):
        name = fn.__code__.co_name
        if any(part in name for part in state["fail"]):
            def kernel(*args):
                state["tried"].append(name)
                raise AssertionError("subgraph_vt.is_tensor()")

            return kernel
        return real_compile(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_)
    return state


def _whole_sites(fused, seed=0):
    """Values and gradients of a plain site (as the activation's node), a gated site, and LoRA-fed ones."""
    from hf_dreg.ops.low_rank import LowRankRows, gated_site_penalty_low_rank, plain_site_activation_low_rank

    gelu = A.GELUActivation()
    spec = spec_for(gelu)
    z, u, w, v = _data(seed)
    g = torch.Generator().manual_seed(seed + 100)
    up = torch.randn(6, 2, generator=g, requires_grad=True)
    down = torch.randn(2, 4, generator=g, requires_grad=True)
    a, p_plain = functions.plain_site_activation_from_weight(z, gelu(z), w, spec, fused)
    a_lora, p_plain_lora = plain_site_activation_low_rank(z, gelu(z), LowRankRows(w, up, down), spec, fused)
    p_gated = functions.gated_site_penalty_from_weights(z, gelu(z), u, w, v, spec, fused)
    p_lora = gated_site_penalty_low_rank(z, gelu(z), u, LowRankRows(w, up, down), v, spec, fused)
    values = [t.detach() for t in (a, p_plain, a_lora, p_plain_lora, p_gated, p_lora)]
    total = sum(t.sum() for t in (a, p_plain, a_lora, p_plain_lora, p_gated, p_lora))
    return values, list(torch.autograd.grad(total, (z, u, w, v, up, down)))


def _assert_matches_eager(values, grads):
    expected_values, expected_grads = _whole_sites(fused=False)
    for a, b in zip(values + grads, expected_values + expected_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()


def test_an_untraceable_activation_node_falls_back_to_the_penalty_as_one_region(untraceable, caplog):
    untraceable["fail"] = ["_site_activation_"]  # torch 2.11: only the node returning its input fails
    with caplog.at_level(logging.WARNING):
        values, grads = _whole_sites(fused=True)
        _whole_sites(fused=True, seed=1)  # known untraceable: straight to the fallback
    tried = sorted(name.rsplit("_", 1)[0] for name in untraceable["tried"])  # names end in a compile counter
    assert tried == ["dreg__plain_site_activation_low_rank", "dreg__plain_site_activation_whole"]
    compiled = {key[0].__name__ for key in KERNELS.compiled}
    assert {"_plain_site_penalty_whole", "_plain_site_penalty_low_rank", "_gated_site_penalty_whole"} <= compiled
    assert "plain_forward" not in compiled  # the penalty-only sites are still one region each
    _assert_matches_eager(values, grads)
    records = [r for r in caplog.records if _WHOLE in r.getMessage()]
    assert len(records) == 2 and all("AssertionError" in r.getMessage() for r in records)  # once per kind of site


def test_untraceable_whole_sites_fall_back_to_their_compiled_parts(untraceable, caplog):
    untraceable["fail"] = ["_whole_", "_low_rank_"]
    with caplog.at_level(logging.WARNING):
        values, grads = _whole_sites(fused=True)
        tried = len(untraceable["tried"])
        _whole_sites(fused=True, seed=1)
    assert tried == 6 and len(untraceable["tried"]) == 6  # each kind tried once
    assert not KERNELS.failed  # the parts are still compiled kernels
    assert any(key[0] is formulas.plain_forward for key in KERNELS.compiled)
    _assert_matches_eager(values, grads)


def test_the_first_compilation_is_said_once(monkeypatch, caplog):
    """No silent minute-long first step: the first compiled kernel of the process logs what is happening."""
    monkeypatch.setattr(KERNELS, "compiled", {})
    monkeypatch.setattr(KERNELS, "failed", False)
    monkeypatch.setattr(KERNELS, "announced", False)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the message, not the compiler, is tested
    spec = spec_for(A.GELUActivation())
    z, w = torch.randn(3, 4), torch.randn(4, 5)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            functions.plain_site_penalty(z, A.GELUActivation()(z), functions.row_stats(w, True), spec, fused=True)
    said = [r.getMessage() for r in caplog.records if "compiling the fused DREG kernels" in r.getMessage()]
    assert len(said) == 1 and "dreg_kernels='eager'" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        functions.plain_site_penalty(z, A.GELUActivation()(z), functions.row_stats(w), spec, fused=False)
    assert not [r for r in caplog.records if "compiling" in r.getMessage()]
