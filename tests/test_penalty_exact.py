"""handle.penalty() against torch.func.jacrev in float64, for every activation and site kind."""

import pytest
import torch
from torch import nn
from transformers import activations as A

import hf_dreg
from hf_dreg.penalty import plain_site_penalty, gated_site_penalty, row_stats, row_dots
from hf_dreg.activations import spec_for
from toy_mlp import ToyModel, reference_penalty

ACTIVATIONS = {
    "GELUActivation": A.GELUActivation,
    "GELUActivation(python)": lambda: A.GELUActivation(use_gelu_python=True),
    "nn.GELU": nn.GELU,
    "nn.GELU(tanh)": lambda: nn.GELU(approximate="tanh"),
    "NewGELUActivation": A.NewGELUActivation,
    "FastGELUActivation": A.FastGELUActivation,
    "AccurateGELUActivation": A.AccurateGELUActivation,
    "GELUTanh": A.GELUTanh,
    "QuickGELUActivation": A.QuickGELUActivation,
    "ClippedGELUActivation": lambda: A.ClippedGELUActivation(-0.1, 1.5),
    "SiLUActivation": A.SiLUActivation,
    "nn.SiLU": nn.SiLU,
    "nn.ReLU": nn.ReLU,
    "nn.Tanh": nn.Tanh,
}
KINDS = ["plain", "gated", "fused_gated"]


def _data(seed=0, batch=3, seq=5, d=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, d, generator=g, dtype=torch.float64) * 1.5
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    return x, mask


def _model(kind, factory, seed=0):
    torch.manual_seed(seed)
    model = ToyModel(kind, factory).double()
    for p in model.parameters():  # larger weights so that every activation regime is visited
        p.data.mul_(3.0)
    return model


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_penalty_matches_jacrev_float64(act, kind):
    model = _model(kind, ACTIVATIONS[act])
    x, mask = _data()
    handle = hf_dreg.attach(model, activations="all", inputs={"x": x[:1], "attention_mask": mask[:1]})
    assert len(handle.sites) == 2 and {s.kind for s in handle.sites} == {kind}
    model(x, attention_mask=mask)
    ours = handle.penalty()
    handle.detach()
    expected = reference_penalty(model, x, mask)
    assert expected > 0
    assert torch.allclose(ours, expected, rtol=1e-8, atol=0), (ours.item(), expected.item())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act", ["GELUActivation", "nn.GELU(tanh)", "QuickGELUActivation", "nn.SiLU", "nn.Tanh", "nn.ReLU"])
def test_penalty_gradient_matches_jacrev_float64(act, kind):
    """The hand-written backward gives the gradient autograd gives through the jacrev reference."""
    model = _model(kind, ACTIVATIONS[act])
    x, mask = _data(seed=1)
    x.requires_grad_(True)
    handle = hf_dreg.attach(model, activations="all", inputs={"x": x[:1].detach(), "attention_mask": mask[:1]})
    model(x, attention_mask=mask)
    ours = torch.autograd.grad(handle.penalty(), [x, *model.parameters()], allow_unused=True)
    handle.detach()
    expected = torch.autograd.grad(reference_penalty(model, x, mask), [x, *model.parameters()], allow_unused=True)
    for a, b in zip(ours, expected):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
            continue
        a = torch.zeros_like(b) if a is None else a
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-10), (a - b).abs().max()


@pytest.mark.parametrize("act", ["GELUActivation", "nn.GELU(tanh)", "FastGELUActivation", "QuickGELUActivation", "nn.SiLU", "nn.Tanh", "ClippedGELUActivation"])
def test_functions_pass_gradcheck(act):
    module = ACTIVATIONS[act]()
    spec = spec_for(module)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)

    def plain(z, w):
        return plain_site_penalty(z, module(z), row_stats(w), spec)

    def gated(z, u, w, v):
        return gated_site_penalty(z, module(z), u, row_stats(w), row_stats(v), row_dots(w, v), spec)

    assert torch.autograd.gradcheck(plain, (z, w))
    assert torch.autograd.gradcheck(gated, (z, u, w, v))
