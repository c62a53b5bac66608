"""PEFT adapters feeding DREG sites: LoRA, AdaLoRA, LoHa and LoKr exactly; other tuner types refused by name.

Two independent references for an adapter model: the same model merged (``merge_and_unload()`` on a
deep copy: plain Linear layers, whose logits must equal the adapter model's) with DREG attached to it,
and a penalty written out by hand from the layer's output z and the effective weight
W = base + sum of ``get_delta_weight`` (act' by autograd), whose gradient must equal hf_dreg's on every
adapter parameter.
"""

import copy

import pytest
import torch
from tiny_models import tiny_inputs, tiny_model

import hf_dreg
from hf_dreg.modeling.layers import UnsupportedLayerError
from hf_dreg.modeling.sites import find_sites

peft = pytest.importorskip("peft")

_PREFIX = "base_model.model."


def _configs():
    target = ["intermediate.dense"]
    return {
        "lora": lambda: peft.LoraConfig(target_modules=target, r=2, lora_alpha=4, init_lora_weights=False),
        "lora_bias": lambda: peft.LoraConfig(target_modules=target, r=2, lora_bias=True, init_lora_weights=False),
        "adalora": lambda: peft.AdaLoraConfig(target_modules=target, init_r=4, target_r=2, total_step=10, init_lora_weights=False),
        "loha": lambda: peft.LoHaConfig(target_modules=target, r=2, init_weights=False),
        "lokr": lambda: peft.LoKrConfig(target_modules=target, r=2, init_weights=False),
    }


_ADAPTER_PARAMS = {
    "lora": ("lora_A", "lora_B"),
    "lora_bias": ("lora_A", "lora_B"),
    "adalora": ("lora_A", "lora_B", "lora_E"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w2"),
}


def _adapter_model(kind, seed=0):
    model = tiny_model("bert", seed=seed).eval()
    torch.manual_seed(seed + 1)
    model = peft.get_peft_model(model, _configs()[kind]())
    with torch.no_grad():  # nonzero, sizable deltas (LoRA's B and AdaLoRA's E start at zero)
        for name, p in model.named_parameters():
            if any(key in name for key in _ADAPTER_PARAMS[kind]) or (kind == "lora_bias" and "lora_B" in name and name.endswith("bias")):
                p.copy_(torch.randn_like(p) * 0.5)
    return model.eval()


def _site_layers(model):
    return [f"{_PREFIX}bert.encoder.layer.{i}.intermediate.dense" for i in range(2)]


def _hand_penalty(model, inputs):
    """mean over sites of the masked mean of (1/m) sum_i act'(z_i)^2 ||W_i||^2, W = base + sum of deltas."""
    modules = dict(model.named_modules())
    captured, hooks = {}, []
    for path in _site_layers(model):
        hooks.append(modules[path].register_forward_hook(lambda m, a, out, path=path: captured.__setitem__(path, out)))
    try:
        model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    mask = inputs["attention_mask"].to(torch.float32)
    values = []
    for path in _site_layers(model):
        layer = modules[path]
        act = modules[path.replace("intermediate.dense", "intermediate.intermediate_act_fn")]
        w = layer.base_layer.weight
        for adapter in layer.active_adapters:
            w = w + layer.get_delta_weight(adapter)
        z = captured[path]
        d1 = torch.autograd.grad(act(z).sum(), z, create_graph=True)[0]
        per_position = (d1**2 * (w**2).sum(1)).sum(-1) / z.shape[-1]
        values.append((per_position * mask).sum() / mask.sum())
    return torch.stack(values).mean()


@pytest.mark.parametrize("kind", list(_configs()))
def test_adapter_penalty_equals_the_merged_model_and_the_hand_formula(kind):
    model = _adapter_model(kind)
    inputs = tiny_inputs(model.base_model.model)
    merged = copy.deepcopy(model).merge_and_unload().eval()
    with torch.no_grad():  # the merged model is the same function (PEFT's forward is base + delta)
        assert torch.allclose(model(**inputs).logits, merged(**inputs).logits, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(
            model.base_model.model.bert.encoder.layer[0].intermediate.dense.base_layer.weight,
            merged.bert.encoder.layer[0].intermediate.dense.weight,
            atol=1e-3,
        )  # and the adapters do change the weight

    handle = hf_dreg.attach(model, kernels="eager")
    assert [s.inputs for s in handle.sites] == [(p,) for p in _site_layers(model)]
    model(**inputs)
    ours = handle.penalty()
    adapter_params = [(n, p) for n, p in model.named_parameters() if any(k in n for k in _ADAPTER_PARAMS[kind])]
    assert len(adapter_params) >= 2 * len(_ADAPTER_PARAMS[kind])
    grads = torch.autograd.grad(ours, [p for _, p in adapter_params])
    handle.detach()

    merged_handle = hf_dreg.attach(merged, kernels="eager")
    with torch.no_grad():
        merged(**inputs)
        reference = merged_handle.penalty()
    merged_handle.detach()
    assert abs(ours.item() - reference.item()) <= 1e-6 * reference.item(), (ours.item(), reference.item())

    by_hand = _hand_penalty(model, inputs)
    assert abs(ours.item() - by_hand.item()) <= 1e-6 * by_hand.item(), (ours.item(), by_hand.item())
    expected = torch.autograd.grad(by_hand, [p for _, p in adapter_params])
    for (name, _), a, b in zip(adapter_params, grads, expected):
        assert torch.count_nonzero(b) > 0, name  # the gradient reaches every adapter parameter
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item()), (name, (a - b).abs().max().item())


def test_lora_on_gpt2_conv1d_equals_the_merged_model():
    model = tiny_model("gpt2").eval()
    model = peft.get_peft_model(model, peft.LoraConfig(target_modules=["c_fc"], r=2, fan_in_fan_out=True, init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    model.eval()
    inputs = tiny_inputs(model.base_model.model)
    merged = copy.deepcopy(model).merge_and_unload().eval()
    values = []
    for m in (model, merged):
        with hf_dreg.attach(m, kernels="eager") as handle, torch.no_grad():
            m(**inputs)
            values.append(handle.penalty().item())
    assert abs(values[0] - values[1]) <= 1e-6 * values[1], values


def test_disabled_adapters_give_the_base_model_penalty():
    model = _adapter_model("loha")
    inputs = tiny_inputs(model.base_model.model)
    base = copy.deepcopy(model.base_model.model)
    for module in base.modules():  # the plain model under the adapters
        for name, child in list(module.named_children()):
            if hasattr(child, "base_layer"):
                setattr(module, name, child.base_layer)
    values = []
    with model.disable_adapter():
        for m in (model, base):
            with hf_dreg.attach(m, kernels="eager") as handle, torch.no_grad():
                m(**inputs)
                values.append(handle.penalty().item())
    assert abs(values[0] - values[1]) <= 1e-7 * values[1], values


# ---- refused by name ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,config,words",
    [
        ("loha", lambda: peft.LoHaConfig(target_modules=["intermediate.dense"], r=2, rank_dropout=0.1), ("LoHa", "rank_dropout=0.1")),
        ("lokr", lambda: peft.LoKrConfig(target_modules=["intermediate.dense"], r=2, module_dropout=0.2), ("LoKr", "module_dropout=0.2")),
        ("dora", lambda: peft.LoraConfig(target_modules=["intermediate.dense"], r=2, use_dora=True), ("DoRA", "plain LoRA")),
        ("ia3", lambda: peft.IA3Config(target_modules=["intermediate.dense"], feedforward_modules=[]), ("IA3", "use LoraConfig")),
        ("vera", lambda: peft.VeraConfig(target_modules=["intermediate.dense"], r=2), ("VeRA", "use LoraConfig")),
    ],
)
def test_unsupported_adapter_feeding_a_site_is_refused_by_name(kind, config, words):
    model = peft.get_peft_model(tiny_model("bert"), config())
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with pytest.raises(UnsupportedLayerError) as info:
            find_sites(model)
        message = str(info.value)
        assert f"{_PREFIX}bert.encoder.layer.0.intermediate.dense" in message
        for word in words:
            assert word in message, (word, message)
        with pytest.raises(ValueError):  # a ValueError, so the CLI reports it
            hf_dreg.attach(model, kernels="eager")


def test_excluding_the_site_of_an_unsupported_adapter_keeps_the_others():
    model = peft.get_peft_model(
        tiny_model("bert"), peft.IA3Config(target_modules=["layer.0.intermediate.dense"], feedforward_modules=[])
    )
    sites = find_sites(model, exclude_modules=["layer.0.intermediate.intermediate_act_fn"])
    assert [s.name for s in sites] == [f"{_PREFIX}bert.encoder.layer.1.intermediate.intermediate_act_fn"]


def test_ia3_away_from_the_sites_works_and_equals_the_merged_model():
    """IA3's default BERT targets: key, value and output.dense (input scaling, after the activation)."""
    config = peft.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])
    model = peft.get_peft_model(tiny_model("bert"), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    model.eval()
    inputs = tiny_inputs(model.base_model.model)
    merged = copy.deepcopy(model).merge_and_unload().eval()
    values = []
    for m in (model, merged):
        with hf_dreg.attach(m, kernels="eager") as handle, torch.no_grad():
            assert [s.output.split(".")[-2:] for s in handle.sites] == [["output", "dense"]] * 2
            m(**inputs)
            values.append(handle.penalty().item())
    assert abs(values[0] - values[1]) <= 1e-6 * values[1], values


@pytest.mark.parametrize("kernels", ["eager", "triton"])
def test_lora_rows_kept_between_steps_follow_every_change_of_the_layer(kernels):
    """The LoRA rows a layer's read keeps between forwards (the same Parameters, read again each step) must follow
    in-place updates, a replaced Parameter, a new scaling, a switch of the active adapter and a dtype change: each
    time the penalty equals the hand formula of the layer as it is then."""
    model = _adapter_model("lora")
    inputs = tiny_inputs(model.base_model.model)
    layer = model.base_model.model.bert.encoder.layer[0].intermediate.dense

    def check():
        with torch.no_grad():
            model(**inputs)
            ours = handle.penalty()
        by_hand = _hand_penalty(model, inputs)
        assert abs(ours.item() - by_hand.item()) <= 1e-5 * by_hand.item(), (ours.item(), by_hand.item())
        return ours.item()

    handle = hf_dreg.attach(model, kernels=kernels)
    try:
        values = [check(), check()]  # the second read from what the first kept
        with torch.no_grad():
            layer.lora_B["default"].weight.mul_(2.0)  # an optimizer's in-place step
        values.append(check())
        layer.lora_A["default"].weight = torch.nn.Parameter(torch.randn_like(layer.lora_A["default"].weight))
        values.append(check())
        layer.scaling["default"] = 5.0
        values.append(check())
        model.add_adapter("other", _configs()["lora"]())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B.other" in name:
                    p.copy_(torch.randn_like(p))
        model.set_adapter("other")
        values.append(check())
        model.set_adapter("default")
        model.double()  # .data swapped under the same Parameters
        values.append(check())
    finally:
        handle.detach()
    assert values[0] == values[1] and len(set(values[1:])) == len(values) - 1, values  # every change changed it
