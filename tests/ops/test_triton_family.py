"""The triton kernel family equals the eager one: every activation and site kind, op by op and on real models.

On a CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py before any kernel is defined): values
and gradients are checked here; launch cost and bf16 arithmetic are the GPU's (study/benchmarks/gpu_check.sh).
The float64 comparison against torch.func.jacrev is in test_penalty_exact.py (parametrized over families).
"""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import tiny_inputs, tiny_model
from transformers import activations as A

import hf_dreg
from hf_dreg.ops import functions
from hf_dreg.ops.activations import spec_for

pytest.importorskip("triton", reason="triton is in the test extra: pip install -e '.[test]'")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("the triton family runs on a CPU only under TRITON_INTERPRET=1", allow_module_level=True)

from hf_dreg.ops import triton_functions  # noqa: E402  (after the interpreter is chosen)

MODULES = {
    "gelu": A.GELUActivation,
    "gelu_tanh": A.GELUTanh,
    "fast_gelu": A.FastGELUActivation,
    "quick_gelu": A.QuickGELUActivation,
    "clipped_gelu": lambda: A.ClippedGELUActivation(-0.1, 1.5),
    "silu": torch.nn.SiLU,
    "relu": torch.nn.ReLU,
    "tanh": torch.nn.Tanh,
}
# positions: more than one backward program (32 rows each) and a ragged last one; units: several column blocks
# (the forward's loop over them made to take three steps, the last ragged)
SHAPES = [(2, 5, 37), (2, 20, 300)]
# every activation on the small shape; the tiling (which does not depend on the activation) on the larger one
CASES = [(act, SHAPES[0]) for act in MODULES] + [(act, SHAPES[1]) for act in ("gelu", "gelu_tanh", "relu")]


@pytest.fixture(autouse=True)
def _small_forward_blocks(monkeypatch):
    monkeypatch.setattr(triton_functions, "FORWARD_BLOCK", 128)


def _close(mine, ref, what):
    scale = max(1.0, ref.abs().max().item())
    assert torch.allclose(mine, ref, rtol=1e-5, atol=1e-5 * scale), (what, (mine - ref).abs().max().item())


def _data(shape, seed):
    g = torch.Generator().manual_seed(seed)
    m = shape[-1]
    z = (torch.randn(shape, generator=g) * 2).requires_grad_(True)
    u = torch.randn(shape, generator=g).requires_grad_(True)
    w = (torch.randn(m, 11, generator=g) / 3).requires_grad_(True)
    v = (torch.randn(m, 11, generator=g) / 3).requires_grad_(True)
    grad_p = torch.randn(shape[:-1], generator=g)
    grad_a = torch.randn(shape, generator=g)
    return z, u, w, v, grad_p, grad_a


@pytest.mark.parametrize("act, shape", CASES)
def test_plain_site_equals_eager_in_float32(act, shape):
    """(a, p) of one node: the activation's own gradient and the penalty's, and the weight's through the row norms."""
    module = MODULES[act]()
    spec = spec_for(module)
    z, _, w, _, grad_p, grad_a = _data(shape, 0)
    results = []
    for kernels in ("eager", "triton"):
        a = module(z)
        if kernels == "eager":
            out, p = functions.plain_site_activation(z, a, functions.row_stats(w), spec)
        else:
            out, p = triton_functions.plain_site(z, a, w, spec)
        assert torch.equal(out, a)
        grads = torch.autograd.grad((out * grad_a).sum() + (p * grad_p).sum(), (z, w))
        results.append((p.detach(), *grads))
    for what, mine, ref in zip(("p", "grad z", "grad W"), results[1], results[0]):
        _close(mine, ref, what)


@pytest.mark.parametrize("act, shape", CASES)
def test_gated_site_equals_eager_in_float32(act, shape):
    module = MODULES[act]()
    spec = spec_for(module)
    z, u, w, v, grad_p, _ = _data(shape, 1)
    results = []
    for kernels in ("eager", "triton"):
        a = module(z)
        if kernels == "eager":
            p = functions.gated_site_penalty(z, a, u, *functions.gated_row_stats(w, v), spec)
        else:
            p = triton_functions.gated_site(z, a, u, (w, v), spec)
        results.append((p.detach(), *torch.autograd.grad((p * grad_p).sum(), (z, u, w, v))))
    for what, mine, ref in zip(("p", "grad g", "grad u", "grad Wg", "grad Wu"), results[1], results[0]):
        _close(mine, ref, what)


@pytest.mark.parametrize("act", ["gelu_tanh", "silu"])
def test_the_fused_product_and_penalty_equal_the_unfused_ones(act):
    """A fused MLP's node gives f(g) * u and p together, with both gradients, as f(g) * u and the penalty apart."""
    module = MODULES[act]()
    spec = spec_for(module)
    g, u, w, v, grad_p, grad_h = _data((2, 20, 300), 2)
    h, p = triton_functions.gated_site(g, None, u, (w, v), spec, product=True)
    mine = (h.detach(), p.detach(), *torch.autograd.grad((h * grad_h).sum() + (p * grad_p).sum(), (g, u, w, v)))
    a = module(g)
    ref_h = a * u
    ref_p = functions.gated_site_penalty(g, a, u, *functions.gated_row_stats(w, v), spec)
    ref = (ref_h.detach(), ref_p.detach(), *torch.autograd.grad((ref_h * grad_h).sum() + (ref_p * grad_p).sum(), (g, u, w, v)))
    for what, x, y in zip(("h", "p", "grad g", "grad u", "grad Wg", "grad Wu"), mine, ref):
        _close(x, y, what)


def test_bf16_inputs_give_float32_penalties_and_gradients_in_their_own_dtypes():
    spec = spec_for(A.GELUTanh())
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(2, 40, 64, generator=g) * 2).to(torch.bfloat16).requires_grad_(True)
    w = torch.randn(64, 8, generator=g).to(torch.bfloat16).requires_grad_(True)
    out, p = triton_functions.plain_site(z, torch.nn.functional.gelu(z, approximate="tanh"), w, spec)
    assert p.dtype == torch.float32
    reference = functions.plain_site_penalty(z, out, functions.row_stats(w), spec)  # f' from z in float32
    _close(p.detach(), reference.detach(), "p")
    (p.sum() + out.float().sum()).backward()
    assert z.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16


def _penalty_and_grads(model, inputs, kernels):
    model.zero_grad(set_to_none=True)
    with hf_dreg.attach(model, activations="all", kernels=kernels) as handle:
        out = model(**inputs)
        penalty = handle.penalty()
        task = (out.logits.float() ** 2).mean()
        (task + 0.7 * penalty).backward()
    return penalty.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _lora_gemma():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(target_modules=["gate_proj", "up_proj", "down_proj"], r=4, lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(tiny_model("gemma"), config)


@pytest.mark.parametrize("family", ["bert", "gpt2", "gemma", "gemma+lora", "t5", "modernbert"])
def test_a_model_under_the_triton_family_equals_eager(family):
    """BERT (plain), GPT-2 (Conv1D), Gemma (GeGLU), Gemma with LoRA (row statistics from the factors), T5
    (encoder-decoder, two masks) and ModernBERT (a fused up-gate layer): the penalty and every gradient."""
    model = (_lora_gemma() if family == "gemma+lora" else tiny_model(family)).eval()  # eval: no dropout between the runs
    inputs = tiny_inputs(model.base_model.model if family == "gemma+lora" else model)
    p0, g0 = _penalty_and_grads(model, inputs, "eager")
    p1, g1 = _penalty_and_grads(model, inputs, "triton")
    assert p0 > 0
    _close(p1, p0, "penalty")
    assert g0.keys() == g1.keys() and g0
    scale = max(g.abs().max().item() for g in g0.values())
    for name in g0:
        assert torch.allclose(g1[name], g0[name], rtol=1e-5, atol=1e-6 * scale), (name, (g1[name] - g0[name]).abs().max())


def test_the_triton_family_on_a_cpu_without_the_interpreter_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="dreg_kernels='auto'"):
        hf_dreg.attach(tiny_model("bert"), kernels="triton")  # refused at attach, before any forward


def test_the_frozen_bases_statistics_follow_an_in_place_change_of_the_weights():
    """Under LoRA the bases' own row statistics come from the bases in every step's kernel: a weight changed in
    place is read again, so the penalty is still the eager family's."""
    model = _lora_gemma().eval()
    inputs = tiny_inputs(model.base_model.model)
    with hf_dreg.attach(model, kernels="triton") as handle:
        model(**inputs)
        first = handle.penalty().detach()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "base_layer" in name and "mlp" in name:
                    p.mul_(1.5)
        model(**inputs)
        second = handle.penalty().detach()
    p_eager, _ = _penalty_and_grads(model, inputs, "eager")
    assert abs(second - first) > 1e-3 * first
    _close(second, p_eager, "penalty after the change")


def _factored(rows, rank, scale, dtype, g, cols=5):
    from hf_dreg.ops.low_rank import LowRankRows

    return LowRankRows(torch.randn(rows, cols, generator=g, dtype=torch.float64).to(dtype),
                       torch.randn(rows, rank, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True),
                       torch.randn(rank, cols, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True), scale)  # fmt: skip


# (gate rank, up rank or None: plain, 0: a dense up weight); a gate rank 0 is a dense gate weight
RANK_CASES = [(3, None), (3, 2), (3, 0), (0, 2)]


# (rows, columns, rows per part of D's gradient): one program each way; three row programs, the last ragged
# (32 rows each), and three column blocks, the last ragged (64 columns each); the same with D's gradient summed
# from three parts of 32 rows (what a weight with more than SPLIT_ROWS rows gets)
LOW_RANK_SHAPES = [(7, 5, None), (70, 150, None), (70, 150, 32)]


@pytest.mark.parametrize("shape", LOW_RANK_SHAPES, ids=str)
@pytest.mark.parametrize("scale", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("ranks", RANK_CASES, ids=str)
def test_lora_row_statistics_kernels_equal_the_general_route_in_float64(ranks, scale, shape, monkeypatch):
    """The LowRankStats kernels (scaling applied in them) against the torch general route: values and the
    gradients of both factors, each weight factored or dense, on one program and on several each way."""
    from hf_dreg.ops.low_rank import LowRankRows, weight_gated_row_stats, weight_row_stats

    rows, cols, split_rows = shape
    if split_rows:
        monkeypatch.setattr(triton_functions, "SPLIT_ROWS", split_rows)
    g = torch.Generator().manual_seed(rows + cols + int(4 * scale))
    gate, up = ranks

    def weight(rank):
        if rank:
            return _factored(rows, rank, scale, torch.float64, g, cols)
        return torch.randn(rows, cols, generator=g, dtype=torch.float64)

    w_gate, w_up = weight(gate), None if up is None else weight(up)
    leaves = [t for w in (w_gate, w_up) if isinstance(w, LowRankRows) for t in (w.up, w.down)]
    weights = [torch.randn(rows, generator=g, dtype=torch.float64) for _ in range(3)]
    mine = triton_functions.low_rank_stats(w_gate, w_up)
    ref = weight_row_stats(w_gate) if w_up is None else weight_gated_row_stats(w_gate, w_up)
    mine, ref = ((mine,), (ref,)) if w_up is None else (mine, ref)
    for a, b in zip(mine, ref):
        assert a.dtype == torch.float64
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad(sum((a * w).sum() for a, w in zip(mine, weights)), leaves)
    gb = torch.autograd.grad(sum((b * w).sum() for b, w in zip(ref, weights)), leaves)
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ranks", [(8, None), (8, 8)], ids=str)
def test_lora_row_statistics_kernels_in_float32_with_a_lora_scaling_match_float64(ranks):
    """A float32 adapter with the scaling LoRA uses (alpha / r, here 1 / sqrt(8) as in rsLoRA), the scaling a
    kernel argument: within float32 rounding of the same statistics in float64."""
    from hf_dreg.ops.low_rank import LowRankRows, weight_gated_row_stats, weight_row_stats

    g = torch.Generator().manual_seed(3)
    scale = 8**-0.5
    w32 = [_factored(40, r, scale, torch.float32, g) for r in ranks if r is not None]
    w64 = [LowRankRows(*(t.detach().double().requires_grad_(t.requires_grad) for t in (w.base, w.up, w.down)), scale) for w in w32]
    pad = [None] * (2 - len(w32))
    mine = triton_functions.low_rank_stats(*w32, *pad)
    ref = weight_row_stats(w64[0]) if len(w64) == 1 else weight_gated_row_stats(*w64)
    mine, ref = ((mine,), (ref,)) if len(w32) == 1 else (mine, ref)
    for a, b in zip(mine, ref):
        assert a.dtype == torch.float32
        _close(a.double(), b, "statistics")
    weights = [torch.randn(40, generator=g, dtype=torch.float64) for _ in range(3)]
    ga = torch.autograd.grad(sum((a * w.float()).sum() for a, w in zip(mine, weights)), [t for w in w32 for t in (w.up, w.down)])
    gb = torch.autograd.grad(sum((b * w).sum() for b, w in zip(ref, weights)), [t for w in w64 for t in (w.up, w.down)])
    for a, b in zip(ga, gb):
        assert a.dtype == torch.float32
        _close(a.double(), b, "gradient")


def test_transformers_gated_mlps_compute_their_product_in_the_sites_node():
    """Under the triton family a Gemma MLP's forward is replaced (this instance only): its activation module is no
    longer called (the product f(g) * u comes from the site's kernel), the model's outputs are those of the model
    without DREG, and detach() puts every forward back with the state dict untouched."""
    model = tiny_model("gemma").eval()
    inputs = tiny_inputs(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(**inputs).logits
    calls = []
    acts = [m.mlp.act_fn for m in model.model.layers]
    counters = [act.register_forward_hook(lambda *_: calls.append(1)) for act in acts]
    with hf_dreg.attach(model, kernels="triton") as handle:
        replaced = [name for name, m in model.named_modules() if "forward" in m.__dict__]
        calls.clear()  # attach's probe ran the model's own forward
        out = model(**inputs)
        handle.penalty()
    assert replaced == [f"model.layers.{i}.mlp" for i in range(len(acts))]
    assert not calls, "the activation module ran: the product was not computed in the site's node"
    torch.testing.assert_close(out.logits, expected, rtol=1e-6, atol=1e-6)
    assert not [name for name, m in model.named_modules() if "forward" in m.__dict__]
    model(**inputs)
    assert len(calls) == len(acts)  # the model's own forward again
    for h in counters:
        h.remove()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_only_the_exact_transformers_gated_forward_is_replaced():
    from transformers.models.gemma.modeling_gemma import GemmaMLP

    from hf_dreg.modeling.fused_mlps import is_transformers_gated_mlp

    class Scaled(GemmaMLP):  # the same parts, another expression: must keep the hooks
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * 0.5)

    model = tiny_model("gemma").eval()
    config = model.config
    assert is_transformers_gated_mlp(model.model.layers[0].mlp)
    assert is_transformers_gated_mlp(tiny_model("llama").model.layers[0].mlp)
    scaled = Scaled(config)
    scaled.load_state_dict(model.model.layers[0].mlp.state_dict())
    assert not is_transformers_gated_mlp(scaled)
    model.model.layers[0].mlp = scaled
    inputs = tiny_inputs(model)
    p0, g0 = _penalty_and_grads(model, inputs, "eager")
    with hf_dreg.attach(model, kernels="triton"):
        assert "forward" not in scaled.__dict__ and "forward" in model.model.layers[1].mlp.__dict__
    p1, g1 = _penalty_and_grads(model, inputs, "triton")
    _close(p1, p0, "penalty")
    for name in g0:
        assert torch.allclose(g1[name], g0[name], rtol=1e-5, atol=1e-7), name


def test_the_replaced_gated_forward_under_gradient_checkpointing_equals_eager_without_it():
    """Recomputed in backward, the replaced MLP forward must give the same product and gradients, and its
    penalty must be counted once."""
    model = tiny_model("gemma").train()  # checkpointing runs in training mode; the tiny Gemma has no dropout
    inputs = tiny_inputs(model)
    p0, g0 = _penalty_and_grads(model, inputs, "eager")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    p1, g1 = _penalty_and_grads(model, inputs, "triton")
    _close(p1, p0, "penalty")
    scale = max(g.abs().max().item() for g in g0.values())
    for name in g0:
        assert torch.allclose(g1[name], g0[name], rtol=1e-5, atol=1e-6 * scale), name
