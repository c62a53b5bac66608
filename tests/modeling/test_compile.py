"""DREG inside the model's own torch.compile graph: no graph break, fullgraph=True works, the same values.

``TrainingArguments(torch_compile=True)`` compiles the model's forward, where DREG's hooks run; the penalty
is read after it. Here the model's forward and the penalty are compiled together, with dynamo's
``explain`` (graph breaks, cold) and with ``fullgraph=True`` on the ``aot_eager`` backend (forward and
backward traced, no code generation: fast enough for the default suite), against the same step uncompiled.
The triton family calls its kernels directly only outside a trace: inside the model's compiled graph its sites
are the same autograd Functions with torch operators (hf_dreg.modeling.hooks.DREGHandle._direct_kernels), so
it is checked here like the others (TRITON_INTERPRET=1, conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_inputs, tiny_model

import hf_dreg


def _attachable(kernels):
    if kernels == "triton":
        pytest.importorskip("triton", reason="triton is in the test extra: pip install -e '.[test]'")


def _model(family):
    if family == "gemma+lora":
        peft = pytest.importorskip("peft")
        config = peft.LoraConfig(target_modules=["gate_proj", "up_proj"], r=2, lora_dropout=0.0, init_lora_weights=False)
        model = peft.get_peft_model(tiny_model("gemma"), config)
        return model.eval(), tiny_inputs(model.base_model.model)
    model = tiny_model(family).eval()
    return model, tiny_inputs(model)


def _step(model, handle):
    def step(inputs):
        return model(**inputs).logits.float().pow(2).mean() + 0.5 * handle.penalty()

    return step


@pytest.mark.parametrize("family, kernels", [("bert", "eager"), ("gpt2", "eager"), ("gemma", "eager"), ("gemma+lora", "eager"),
                                             ("t5", "eager"), ("bert", "compiled"), ("gemma", "compiled"),
                                             ("bert", "triton"), ("gemma+lora", "triton")])  # fmt: skip
def test_the_model_and_the_penalty_compile_without_a_graph_break(family, kernels):
    _attachable(kernels)
    model, inputs = _model(family)
    torch._dynamo.reset()
    with hf_dreg.attach(model, activations="all", kernels=kernels) as handle:
        explained = torch._dynamo.explain(_step(model, handle))(inputs)
    torch._dynamo.reset()
    plain = torch._dynamo.explain(lambda inputs: model(**inputs).logits.float().pow(2).mean())(inputs)
    reasons = [str(b.reason)[:300] for b in explained.break_reasons]
    # DREG adds none: a model without breaks of its own has none with DREG; where the model breaks itself
    # (torch 2.11 breaks T5 at its cache's copy.deepcopy of the config, torch 2.13 does not) the frames after its
    # break are traced again, so the counts differ, but every break is one of the model's own
    if plain.graph_break_count == 0:
        assert explained.graph_count == 1
        assert explained.graph_break_count == 0, reasons
    assert set(reasons) <= {str(b.reason)[:300] for b in plain.break_reasons}, reasons
    assert not any("hf_dreg" in str(frame) for b in explained.break_reasons for frame in b.user_stack), reasons
    if torch.__version__ >= "2.13":
        assert explained.graph_break_count == 0, reasons


@pytest.mark.parametrize("family, kernels", [("bert", "eager"), ("gemma+lora", "eager"), ("gemma", "compiled"), ("gemma+lora", "triton")])
def test_a_fullgraph_compiled_step_gives_the_uncompiled_loss_and_gradients(family, kernels):
    _attachable(kernels)
    model, inputs = _model(family)
    params = [p for p in model.parameters() if p.requires_grad]
    with hf_dreg.attach(model, activations="all", kernels=kernels) as handle:
        step = _step(model, handle)
        expected = step(inputs)
        expected_grads = torch.autograd.grad(expected, params, allow_unused=True)
        torch._dynamo.reset()
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
        loss = compiled(inputs)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        warm = compiled(inputs)  # warm: the second call runs the same graph (fullgraph=True raises at any break)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0)
    assert torch.allclose(warm, expected, rtol=1e-6, atol=0)
    assert sum(a is not None for a in grads) > 0
    for a, b in zip(grads, expected_grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
