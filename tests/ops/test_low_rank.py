"""LoRA layers' row statistics from their factors (hf_dreg.ops.low_rank), never from the dense weight.

References: the dense weight ``W0 + U D`` formed and reduced by plain autograd (float64), for values and
for the gradients of every factor; the merged model (``merge_and_unload``) for the penalty of whole LoRA
models, gated and fused-gated; the dense path of hf_dreg itself (``layers.weight_rows``, tested against
the merged model in test_adapters.py) for the gradients reaching every adapter. And what the backward
keeps: no tensor of a weight's size besides the parameters themselves.
"""

import copy

import pytest
import torch
from tiny_models import tiny_inputs, tiny_model

import hf_dreg
from hf_dreg.modeling.layers import weight_rows
from hf_dreg.ops.low_rank import LowRankRows, weight_gated_row_stats, weight_row_stats

peft = pytest.importorskip("peft")
from hf_dreg.modeling import hooks as attach_module

OUT, IN, RANK = 12, 7, 3


def _factors(seed, base_grad, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(OUT, IN, generator=g, dtype=torch.float64).requires_grad_(base_grad)
    up = torch.randn(OUT, RANK, generator=g, dtype=torch.float64).requires_grad_()
    down = torch.randn(RANK, IN, generator=g, dtype=torch.float64).requires_grad_()
    return LowRankRows(base, up, down, scale)


def _leaves(*weights):
    out = []
    for w in weights:
        out += [t for t in ((w.base, w.up, w.down) if isinstance(w, LowRankRows) else (w,)) if t.requires_grad]
    return out


def _dense(w):
    return w.base + w.scale * (w.up @ w.down) if isinstance(w, LowRankRows) else w


@pytest.mark.parametrize("scale", [1.0, 1.7])  # 1.7: a LoRA scaling (alpha / r) kept apart from the factors
@pytest.mark.parametrize("base_grad", [False, True])
def test_row_stats_from_factors_equal_the_dense_weight_with_gradients(base_grad, scale):
    w = _factors(0, base_grad, scale)
    weights = torch.randn(OUT, dtype=torch.float64)
    ours = weight_row_stats(w)
    reference = (_dense(w) ** 2).sum(-1)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad((ours * weights).sum(), _leaves(w))
    expected = torch.autograd.grad((reference * weights).sum(), _leaves(w))
    assert len(got) == (3 if base_grad else 2)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scale", [1.0, 1.7])
@pytest.mark.parametrize("which", ["both", "gate", "up"])
@pytest.mark.parametrize("base_grad", [False, True])
def test_gated_row_stats_from_factors_equal_the_dense_weights_with_gradients(which, base_grad, scale):
    gate, up = _factors(1, base_grad, scale), _factors(2, base_grad, 0.5 * scale)
    if which == "gate":
        up = up.base.detach().requires_grad_(base_grad) if base_grad else up.base.detach()
    if which == "up":
        gate = gate.base.detach().requires_grad_(base_grad) if base_grad else gate.base.detach()
    ours = weight_gated_row_stats(gate, up)
    g, u = _dense(gate), _dense(up)
    reference = ((g * g).sum(-1), (u * u).sum(-1), (g * u).sum(-1))
    coefficients = [torch.randn(OUT, dtype=torch.float64) for _ in range(3)]
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    leaves = _leaves(gate, up)
    got = torch.autograd.grad(sum((c * t).sum() for c, t in zip(coefficients, ours)), leaves)
    expected = torch.autograd.grad(sum((c * t).sum() for c, t in zip(coefficients, reference)), leaves)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_a_chunk_of_factored_rows_is_the_chunk_of_the_dense_rows():
    w = _factors(3, False, 1.7)
    for index in range(2):
        torch.testing.assert_close(_dense(w.chunk(index, 2)), _dense(w).chunk(2, dim=0)[index])


def _lora_model(family, targets, adapters=("default",), seed=0):
    model = tiny_model(family, seed=seed).to(torch.float64).eval()
    config = peft.LoraConfig(target_modules=targets, r=2, lora_alpha=6, init_lora_weights=False)
    model = peft.get_peft_model(model, config, adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, peft.LoraConfig(target_modules=targets, r=3, lora_alpha=3, init_lora_weights=False))
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # sizable deltas on every adapter (B starts at zero)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    if len(adapters) > 1:
        model.base_model.set_adapter(list(adapters))
    return model.eval()


CASES = {
    "gemma-gate-and-up": ("gemma", ["gate_proj", "up_proj"], ("default",)),
    "gemma-gate-only": ("gemma", ["gate_proj"], ("default",)),
    "gemma-up-only": ("gemma", ["up_proj"], ("default",)),
    "gemma-two-active-adapters": ("gemma", ["gate_proj", "up_proj", "down_proj"], ("first", "second")),
    "modernbert-fused-gate-up": ("modernbert", ["Wi"], ("default",)),
    "gpt2-conv1d": ("gpt2", ["c_fc"], ("default",)),
}


def _penalty_and_grads(model, inputs):
    handle = hf_dreg.attach(model, kernels="eager")
    try:
        model(**inputs)
        value = handle.penalty()
        params = [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
        grads = torch.autograd.grad(value, params, allow_unused=True)
    finally:
        handle.detach()
    return value, grads


@pytest.mark.parametrize("case", list(CASES))
def test_lora_model_penalty_from_factors_equals_the_merged_model_and_the_dense_path(case, monkeypatch):
    family, targets, adapters = CASES[case]
    model = _lora_model(family, targets, adapters)
    inputs = tiny_inputs(model.base_model.model)
    ours, grads = _penalty_and_grads(model, inputs)

    merged = copy.deepcopy(model).merge_and_unload().eval()
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, merged(**inputs).logits, rtol=1e-9, atol=1e-10)
    handle = hf_dreg.attach(merged, kernels="eager")
    with torch.no_grad():
        merged(**inputs)
        reference = handle.penalty()
    handle.detach()
    assert abs(ours.item() - reference.item()) <= 1e-10 * reference.item(), (ours.item(), reference.item())

    monkeypatch.setattr(attach_module, "penalty_weight_rows", weight_rows)  # the dense weight, formed by PEFT
    dense, dense_grads = _penalty_and_grads(model, inputs)
    assert abs(ours.item() - dense.item()) <= 1e-10 * dense.item()
    assert sum(g is not None and bool(torch.count_nonzero(g)) for g in dense_grads) >= 2
    for a, b in zip(grads, dense_grads):
        if b is None:
            assert a is None or not torch.count_nonzero(a)
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "compiled-region"])
def test_the_backward_keeps_no_weight_sized_tensor_of_a_lora_layer(fused):
    model = _lora_model("gemma", ["gate_proj", "up_proj"]).to(torch.float32)
    inputs = tiny_inputs(model.base_model.model)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_size = 24 * 16
    kept = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in parameters and t.numel() >= weight_size and t.dim() == 2 and t.shape[-1] == 16:
            kept.append(tuple(t.shape))
        return t

    handle = hf_dreg.attach(model, kernels="compiled" if fused else "eager")
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**inputs)
            handle.penalty()
    finally:
        handle.detach()
    assert (24, 16) not in kept, kept


def test_a_bf16_model_with_float32_lora_adapters_is_accepted_and_matches_float64():
    """PEFT keeps adapters in float32 on a bf16 model and adds their output to the bf16 base output:
    the layer computes base + delta only up to bf16 rounding, which the site finder must accept."""
    model = tiny_model("gemma", seed=0).to(torch.bfloat16)
    config = peft.LoraConfig(target_modules=["gate_proj", "up_proj"], r=2, init_lora_weights=False)
    model = peft.get_peft_model(model, config).eval()
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    inputs = tiny_inputs(model.base_model.model)
    handle = hf_dreg.attach(model, kernels="eager")
    model(**inputs)
    ours = handle.penalty()
    handle.detach()
    wide = copy.deepcopy(model).to(torch.float64)  # the same weights, exactly
    handle = hf_dreg.attach(wide, kernels="eager")
    wide(**inputs)
    reference = handle.penalty()
    handle.detach()
    assert ours.dtype == torch.float32
    assert abs(ours.item() - reference.item()) <= 3e-2 * reference.item(), (ours.item(), reference.item())
