"""find_sites on the tiny models of every family: which sites, of which kind, fed by which layers; bad input."""

import pytest
import torch
from site_expectations import expected_sites
from tiny_models import EXPECTED_KIND, FAMILIES, tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import hf_dreg
from hf_dreg.modeling.sites import NoSitesError, find_sites

_MODELS = {}


def _model(family, act=None):
    """Built once per (family, act): find_sites never changes the model (checked below)."""
    key = (family, act)
    if key not in _MODELS:
        _MODELS[key] = tiny_model(family, act=act)
    return _MODELS[key]


def _check_sites(model, sites, expected, activation_class=None):
    modules = dict(model.named_modules())
    assert [s.name for s in sites] == [e.name for e in expected]
    for site, exp in zip(sites, expected):
        assert site.kind == exp.kind, site
        assert site.inputs == exp.inputs, site
        assert site.output == exp.output, site
        assert site.mask_key == exp.mask_key, site
        assert site.activation == type(modules[site.name]).__name__, site
        if activation_class is not None:
            assert site.activation == activation_class, site
        assert site.width == 24, site
        assert site.gate == exp.inputs[0], site
        if exp.kind == "plain":
            assert site.up is None and site.gate_chunk is None and site.up_chunk is None, site
        elif exp.kind == "gated":
            assert site.up == exp.inputs[1] and site.gate_chunk is None and site.up_chunk is None, site
        else:  # ModernBERT: input, gate = Wi(x).chunk(2); act(input) * gate
            assert site.up == exp.inputs[0] and site.gate_chunk == (0, 2) and site.up_chunk == (1, 2), site


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("activations", ["gelu", "all"])
def test_one_site_per_mlp_layer(family, activations):
    model = _model(family)
    expected = expected_sites(family)
    assert {e.kind for e in expected} == {EXPECTED_KIND.get(family, "plain")}
    assert len(expected) == (4 if family == "t5" else 2)
    if family == "llama" and activations == "gelu":  # SiLU: no GELU site
        with pytest.raises(NoSitesError):
            find_sites(model, activations=activations)
        return
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sites = find_sites(model, activations=activations)
    _check_sites(model, sites, expected)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", FAMILIES)
def test_feeding_layers_are_the_real_layers(family):
    model = _model(family)
    modules = dict(model.named_modules())
    activations = "silu" if family == "llama" else "gelu"
    for site in find_sites(model, activations=activations):
        for path in site.inputs:
            layer = modules[path]
            if family == "gpt2":
                assert isinstance(layer, Conv1D)
            else:
                assert type(layer) is nn.Linear
        width_in = modules[site.output]
        assert isinstance(width_in, (nn.Linear, Conv1D))


def test_llama_silu_family_finds_the_gated_sites():
    model = _model("llama")
    _check_sites(model, find_sites(model, activations="silu"), expected_sites("llama"), "SiLUActivation")
    _check_sites(model, find_sites(model, activations=["silu", "gelu"]), expected_sites("llama"))
    _check_sites(model, find_sites(model, activations="swish"), expected_sites("llama"))


# ---- what is not a site ---------------------------------------------------------------------------


def test_bert_pooler_tanh_is_not_a_site():
    model = _model("bert")
    assert isinstance(model.bert.pooler.activation, nn.Tanh)
    names = [s.name for s in find_sites(model, activations="all")]
    assert "bert.pooler.activation" not in names
    # asking for tanh only: the pooler's tanh is the only tanh, and it is not an MLP site
    with pytest.raises(NoSitesError) as info:
        find_sites(model, activations="tanh")
    assert "Tanh" in str(info.value)


@pytest.mark.parametrize("family,head", [("electra", "classifier.activation"), ("modernbert", "head.act")])
def test_classification_head_activation_is_not_a_site(family, head):
    model = _model(family)
    modules = dict(model.named_modules())
    assert type(modules[head]).__name__ == "GELUActivation"  # a GELU, so it would be eligible by class
    names = [s.name for s in find_sites(model, activations="all")]
    assert head not in names
    assert len(names) == 2


def test_roberta_all_has_only_the_mlp_sites():
    model = _model("roberta")
    _check_sites(model, find_sites(model, activations="all"), expected_sites("roberta"))


@pytest.mark.parametrize(
    "act,cls,family", [("relu", "ReLU", "relu"), ("tanh", "Tanh", "tanh"), ("silu", "SiLUActivation", "silu")]
)
def test_bert_with_other_activation(act, cls, family):
    model = _model("bert", act)
    expected = expected_sites("bert")
    _check_sites(model, find_sites(model, activations="all"), expected, cls)
    _check_sites(model, find_sites(model, activations=family), expected, cls)
    # the pooler's tanh is never a site, also when the MLPs use tanh
    assert "bert.pooler.activation" not in [s.name for s in find_sites(model, activations="all")]
    with pytest.raises(NoSitesError) as info:
        find_sites(model, activations="gelu")
    assert cls in str(info.value)


# ---- bad input ------------------------------------------------------------------------------------


def test_no_sites_lists_the_activation_classes():
    model = _model("llama")
    with pytest.raises(NoSitesError) as info:
        find_sites(model)  # default activations="gelu"
    assert "SiLUActivation" in str(info.value)
    with pytest.raises(NoSitesError):
        hf_dreg.attach(model, kernels="eager")
    assert issubclass(NoSitesError, ValueError)


@pytest.mark.parametrize("act,cls", [("mish", "MishActivation"), ("relu2", "ReLUSquaredActivation")])
def test_unsupported_mlp_activation_is_named(act, cls):
    model = _model("bert", act)
    assert type(model.bert.encoder.layer[0].intermediate.intermediate_act_fn).__name__ == cls
    with pytest.raises(ValueError) as info:
        find_sites(model, activations="all")
    assert cls in str(info.value)
    with pytest.raises(ValueError) as info:
        hf_dreg.attach(model, activations="all", kernels="eager")
    assert cls in str(info.value)
    # excluding the unsupported MLP activations leaves no site: a NoSitesError, not a crash
    with pytest.raises(NoSitesError):
        find_sites(model, activations="all", exclude_modules=r".*intermediate_act_fn")
    # the default GELU choice: no site, and the message names what the MLPs use
    with pytest.raises(NoSitesError) as info:
        find_sites(model)
    assert cls in str(info.value)


@pytest.mark.parametrize("choice", ["foo", ["gelu", "foo"], "gelu_new"])
def test_unknown_activation_choice(choice):
    model = _model("bert")
    with pytest.raises(ValueError) as info:
        find_sites(model, activations=choice)
    assert not isinstance(info.value, NoSitesError)
    message = str(info.value)
    for valid in ("gelu", "all", "silu", "relu", "tanh"):
        assert repr(valid) in message or valid in message
    assert "foo" in message or "gelu_new" in message
    with pytest.raises(ValueError):
        hf_dreg.attach(model, activations=choice, kernels="eager")


# ---- exclude_modules ------------------------------------------------------------------------------


def test_exclude_modules_list_suffix_and_full_path():
    model = _model("bert")
    layer0 = "bert.encoder.layer.0.intermediate.intermediate_act_fn"
    layer1 = "bert.encoder.layer.1.intermediate.intermediate_act_fn"
    for exclude in (["layer.0.intermediate.intermediate_act_fn"], [layer0], ["0.intermediate.intermediate_act_fn"]):
        assert [s.name for s in find_sites(model, exclude_modules=exclude)] == [layer1]
    # a suffix matches whole path components only
    assert len(find_sites(model, exclude_modules=["yer.0.intermediate.intermediate_act_fn"])) == 2
    assert len(find_sites(model, exclude_modules=["intermediate_act"])) == 2
    # excluding every site
    with pytest.raises(NoSitesError):
        find_sites(model, exclude_modules=["intermediate_act_fn"])
    # attach honours it
    handle = hf_dreg.attach(model, exclude_modules=["layer.1.intermediate.intermediate_act_fn"], kernels="eager")
    try:
        assert [s.name for s in handle.sites] == [layer0]
    finally:
        handle.detach()


def test_exclude_modules_regex_is_a_full_match():
    model = _model("t5")
    sites = find_sites(model, exclude_modules=r"decoder\..*")
    assert [s.name for s in sites] == [e.name for e in expected_sites("t5")[:2]]
    sites = find_sites(model, exclude_modules=r".*block\.1\..*")
    assert [s.name for s in sites] == [e.name for e in expected_sites("t5") if ".block.0." in e.name]
    # full match: a pattern matching only part of the path removes nothing
    assert len(find_sites(model, exclude_modules=r"decoder")) == 4
    assert len(find_sites(model, exclude_modules=r"block\.1")) == 4


def test_find_sites_leaves_no_hooks_and_keeps_mode():
    model = _model("bert")
    model.train()
    state = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    find_sites(model)
    assert model.training and all(m.training for m in model.modules())
    assert state == {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    model.eval()
    find_sites(model)
    assert not model.training
