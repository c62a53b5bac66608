"""find_sites on meta-device models (FSDP's cpu-RAM-efficient loading) and where it reads the weights.

The meta models are compared against the same config built for real: the Site lists must be equal.
The weight-read test watches every Linear/Conv1D's ``weight`` and ``bias`` attribute and records whether
each read made by hf_dreg's code happened while that very layer was being called (between a forward
pre-hook and a forward hook registered before find_sites, the way ZeRO-3 gathers and frees weights).
"""

import sys
from pathlib import Path

import pytest
import torch
from site_expectations import expected_sites
from tiny_models import FAMILIES, _config, tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import hf_dreg
from hf_dreg.modeling.sites import MetaProbeError, NoSitesError, find_sites

_HF_DREG = Path(hf_dreg.__file__).resolve().parent


def _meta_model(family):
    config, cls = _config(family)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        return cls(config)


def _real_model(family):
    return tiny_model(family)


def _assert_same_sites(ours, reference):
    assert ours == reference
    assert [s.family for s in ours] == [s.family for s in reference]  # family is not part of Site equality


@pytest.mark.parametrize("family", FAMILIES)
def test_meta_model_has_the_sites_of_the_real_model(family):
    meta = _meta_model(family)
    assert all(p.is_meta for p in meta.parameters())
    reference = find_sites(_real_model(family), activations="all")
    assert [s.name for s in reference] == [e.name for e in expected_sites(family)]  # the reference is right
    buffers = dict(meta.named_buffers())
    _assert_same_sites(find_sites(meta, activations="all"), reference)
    # nothing was materialised or swapped
    assert all(p.is_meta for p in meta.parameters())
    assert all(buffers[k] is v for k, v in meta.named_buffers())


@pytest.mark.parametrize("family", ["bert", "llama", "gemma", "modernbert"])
def test_meta_model_as_fsdp_ranks_hold_it(family):
    """Transformers' FSDP loading on ranks > 0: parameters and persistent buffers on meta,
    non-persistent buffers as CPU zeros (modeling_utils: "Non-persistent buffers need real placeholders")."""
    model = _meta_model(family)
    placed = 0
    for module in model.modules():
        for key in list(module._buffers):
            if key in module._non_persistent_buffers_set and module._buffers[key] is not None:
                module._buffers[key] = torch.zeros_like(module._buffers[key], device="cpu")
                placed += 1
    assert placed > 0  # position ids / rotary frequencies
    before = dict(model.named_buffers())
    reference = find_sites(_real_model(family), activations="all")
    _assert_same_sites(find_sites(model, activations="all"), reference)
    after = dict(model.named_buffers())
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)  # swapped back
    assert all(not b.is_meta for k, b in after.items() if not before[k].is_meta)


def test_attach_on_a_meta_model_finds_the_sites():
    handle = hf_dreg.attach(_meta_model("t5"), kernels="eager")
    try:
        assert [s.name for s in handle.sites] == [e.name for e in expected_sites("t5")]
    finally:
        handle.detach()


def test_partly_meta_model_that_cannot_run_names_the_setting():
    model = _meta_model("bert")
    real = dict(_real_model("bert").named_parameters())
    for name in ("bert.embeddings.word_embeddings.weight", "bert.embeddings.LayerNorm.weight"):
        owner, key = name.rsplit(".", 1)
        model.get_submodule(owner)._parameters[key] = nn.Parameter(real[name].detach().clone())
    with pytest.raises(MetaProbeError) as info:
        find_sites(model)
    message = str(info.value)
    assert "fsdp_cpu_ram_efficient_loading: false" in message
    assert "Build the model on one device" in message
    assert "39 of its 41 parameter tensors" in message
    assert isinstance(info.value, RuntimeError)


def test_weight_dependent_control_flow_on_meta_is_a_clear_error():
    """A data-dependent branch on a weight cannot be answered on meta (only input-only values have twins)."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)

        def forward(self, x):
            h = self.fc1(x)
            if bool(h.abs().max() > 0):  # depends on the weights
                h = self.act(h)
            return self.fc2(h)

    with torch.device("meta"):
        model = Branchy()
    with pytest.raises(MetaProbeError, match="fsdp_cpu_ram_efficient_loading"):
        find_sites(model, inputs={"x": torch.randn(1, 3, 4)})
    # the same model for real: one plain site
    assert [s.name for s in find_sites(Branchy(), inputs={"x": torch.randn(1, 3, 4)})] == ["act"]


# ---- the numerical check is done inside the forward, and skipped on meta only -------------------


class _Doubled(nn.Linear):
    """Computes x @ (2W).T + b: not the weight hf_dreg reads."""

    def forward(self, x):
        return nn.functional.linear(x, 2 * self.weight, self.bias)


class _Mlp(nn.Module):
    def __init__(self, first=nn.Linear):
        super().__init__()
        self.fc1, self.act, self.fc2 = first(4, 8), nn.GELU(), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_layer_not_computing_its_weight_is_refused_and_skipped_on_meta():
    inputs = {"x": torch.randn(1, 3, 4)}
    assert [s.name for s in find_sites(_Mlp(), inputs=inputs)] == ["act"]
    with pytest.raises(ValueError, match=r"'fc1' \(_Doubled\) feeds an activation but does not compute"):
        find_sites(_Mlp(_Doubled), inputs=inputs)
    with pytest.raises(NoSitesError):  # excluding its site, as the message says, is no longer that error
        find_sites(_Mlp(_Doubled), inputs=inputs, exclude_modules=["act"])
    with torch.device("meta"):
        model = _Mlp(_Doubled)
    assert [s.name for s in find_sites(model, inputs=inputs)] == ["act"]  # no values: not checked


def test_in_bf16_a_layer_not_computing_its_weight_is_still_refused():
    inputs = {"x": torch.randn(1, 3, 4, dtype=torch.bfloat16)}
    assert [s.name for s in find_sites(_Mlp().to(torch.bfloat16), inputs=inputs)] == ["act"]
    with pytest.raises(ValueError, match=r"'fc1' \(_Doubled\) feeds an activation but does not compute"):
        find_sites(_Mlp(_Doubled).to(torch.bfloat16), inputs=inputs)


# ---- every weight read happens inside the layer's own call --------------------------------------

_WATCHED = {}


def _watched_class(cls):
    if cls not in _WATCHED:

        def reader(attr):
            def fget(self):
                caller = Path(sys._getframe(1).f_code.co_filename).resolve()
                if caller.is_relative_to(_HF_DREG):
                    self._dreg_reads.append((attr, self._dreg_inside))
                return self._parameters[attr]

            return property(fget)

        _WATCHED[cls] = type(f"Watched{cls.__name__}", (cls,), {"weight": reader("weight"), "bias": reader("bias")})
    return _WATCHED[cls]


def _watch(model):
    """Make every Linear/Conv1D record hf_dreg's reads of its weight/bias, with 'inside its call' or not."""
    layers = {}
    for path, module in model.named_modules():
        if type(module) in (nn.Linear, Conv1D):
            module.__class__ = _watched_class(type(module))
            module._dreg_reads, module._dreg_inside = [], False
            # registered before find_sites runs, as ZeRO-3 registers its gather (pre) and release (post) hooks
            module.register_forward_pre_hook(lambda m, args: setattr(m, "_dreg_inside", True))
            module.register_forward_hook(lambda m, args, out: setattr(m, "_dreg_inside", False))
            layers[path] = module
    return layers


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5", "gemma"])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_find_sites_reads_weights_only_inside_each_layers_forward(family, device):
    model = _real_model(family) if device == "cpu" else _meta_model(family)
    layers = _watch(model)
    sites = find_sites(model, activations="all")
    assert [s.name for s in sites] == [e.name for e in expected_sites(family)]
    outside = {path: [attr for attr, inside in m._dreg_reads if not inside] for path, m in layers.items()}
    assert not any(outside.values()), {p: r for p, r in outside.items() if r}
    # not vacuous: every feeding layer and every projection back was read (inside its forward)
    for site in sites:
        for path in (*site.inputs, site.output):
            assert ("weight", True) in layers[path]._dreg_reads, path


def test_the_watch_sees_a_read_outside_the_forward():
    """The watch itself: hf_dreg's weight_rows called outside any forward is recorded as outside."""
    from hf_dreg.modeling.layers import weight_rows

    model = _real_model("bert")
    layers = _watch(model)
    path = "bert.encoder.layer.0.intermediate.dense"
    weight_rows(layers[path])
    assert layers[path]._dreg_reads == [("weight", False)]


def test_input_dependent_shapes_are_exact_on_meta():
    """Values computed from the inputs alone (here: the number of unmasked tokens) have real twins, so
    a data-dependent shape on meta is the real one, and so is everything that follows from it."""

    class Trimming(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.fc1, self.act, self.fc2 = nn.Embedding(20, 4), nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)

        def forward(self, input_ids, attention_mask):
            keep = int(attention_mask.sum())  # .item() on meta: answered by the twin
            h = self.embed(input_ids[:, :keep])
            if bool((attention_mask[:, :keep] == 1).all()):
                h = h + self.fc2(self.act(self.fc1(h)))
            return h

    ids = torch.tensor([[3, 4, 5, 6, 7]])
    for mask, key in ((torch.tensor([[1, 1, 1, 0, 0]]), None), (torch.ones(1, 5, dtype=torch.long), "attention_mask")):
        inputs = {"input_ids": ids, "attention_mask": mask}
        reference = find_sites(Trimming(), inputs=inputs)
        with torch.device("meta"):
            model = Trimming()
        sites = find_sites(model, inputs=inputs)
        assert sites == reference and [s.mask_key for s in sites] == [key]
