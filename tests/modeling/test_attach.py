"""attach() on the tiny real models: exact penalty and gradient against jacrev, masks, reversibility, errors."""

import os
import subprocess
import sys
import sysconfig
import textwrap
import warnings

import pytest
import torch
from site_expectations import capture_inputs, expected_sites, reference_penalty, reference_per_position
from tiny_models import tiny_inputs, tiny_model

import hf_dreg
from hf_dreg.ops import functions
from hf_dreg.ops.kernels import KERNELS

_ACTIVATIONS = {"llama": "silu"}  # the default ("gelu") for the others


def _f64_model(family, seed=0):
    model = tiny_model(family, dtype=torch.float64, seed=seed).eval()
    with torch.no_grad():  # larger weights so that the activations leave their linear regime
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(4.0)
    return model


def _inputs(model, family, seed=0):
    inputs = tiny_inputs(model, seed=seed)
    if family == "t5":
        mask = torch.ones_like(inputs["decoder_input_ids"])
        mask[1, 2:] = 0
        mask[2, 3:] = 0
        inputs["decoder_attention_mask"] = mask
    return inputs


def _masks(inputs):
    return {k: inputs[k] for k in ("attention_mask", "decoder_attention_mask") if k in inputs}


def _run(model, family, inputs, **attach_kwargs):
    """Attach, capture each site's input x, forward; returns (handle, captured x, output)."""
    handle = hf_dreg.attach(model, activations=_ACTIVATIONS.get(family, "gelu"), **{"kernels": "eager", **attach_kwargs})
    captured, hooks = capture_inputs(model, expected_sites(family))
    try:
        out = model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return handle, captured, out


# ---- the value, against jacrev ---------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "vit", "t5", "llama", "gemma", "modernbert"])
def test_penalty_matches_jacrev_on_real_models(family):
    model = _f64_model(family)
    inputs = _inputs(model, family)
    handle, captured, _ = _run(model, family, inputs)
    expected = expected_sites(family)
    assert [s.name for s in handle.sites] == [e.name for e in expected]
    with torch.no_grad():
        ours = handle.penalty()
    per_site = handle.per_site()
    handle.detach()  # the hooks must not run inside jacrev
    assert ours.dtype == torch.float64
    with torch.no_grad():
        ref = reference_penalty(model, expected, captured, _masks(inputs))
        assert ref > 0
        assert abs(ours.item() - ref.item()) / ref.item() < 1e-8, (ours.item(), ref.item())
        for site in expected:  # every site on its own, too
            one = reference_penalty(model, [site], captured, _masks(inputs))
            assert abs(per_site[site.name] - one.item()) / one.item() < 1e-8, site.name


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_gradient_matches_jacrev_on_real_models(family):
    model = _f64_model(family, seed=1)
    inputs = _inputs(model, family, seed=1)
    handle, captured, _ = _run(model, family, inputs)
    params = [p for p in model.parameters()]
    ours = torch.autograd.grad(handle.penalty(), params, retain_graph=True, allow_unused=True)
    handle.detach()
    ref = reference_penalty(model, expected_sites(family), captured, _masks(inputs))
    expected = torch.autograd.grad(ref, params, allow_unused=True)
    names = [n for n, _ in model.named_parameters()]
    checked = 0
    for name, a, b in zip(names, ours, expected):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0, name
            continue
        a = torch.zeros_like(b) if a is None else a
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-12), (name, (a - b).abs().max().item(), b.abs().max().item())
        checked += int(torch.count_nonzero(b) > 0)
    assert checked >= 10  # the gradient reaches the feeding layers and everything below them


# ---- masks ---------------------------------------------------------------------------------------


def test_padding_positions_do_not_change_the_penalty():
    model = _f64_model("bert")
    inputs = tiny_inputs(model)
    mask = inputs["attention_mask"]
    assert (mask == 0).any()
    handle = hf_dreg.attach(model, kernels="eager")
    with torch.no_grad():
        model(**inputs)
        first = handle.penalty()
        first_unmasked = handle.penalty(attention_mask=torch.ones_like(mask))
        changed = dict(inputs)
        changed["input_ids"] = torch.where(mask.bool(), inputs["input_ids"], (inputs["input_ids"] + 17) % 90 + 5)
        assert not torch.equal(changed["input_ids"], inputs["input_ids"])
        model(**changed)
        second = handle.penalty()
        second_unmasked = handle.penalty(attention_mask=torch.ones_like(mask))
    handle.detach()
    assert torch.allclose(first, second, rtol=1e-12, atol=0), (first.item(), second.item())
    # the padded positions did change, so the mask is what kept them out
    assert not torch.allclose(first_unmasked, second_unmasked, rtol=1e-6, atol=0)
    assert not torch.allclose(first, first_unmasked, rtol=1e-6, atol=0)


def test_explicit_attention_mask_overrides_the_forward_mask():
    family = "bert"
    model = _f64_model(family)
    inputs = tiny_inputs(model)
    handle, captured, _ = _run(model, family, inputs)
    other = torch.zeros_like(inputs["attention_mask"])
    other[0, :2] = 1
    other[2, 3:] = 1
    with torch.no_grad():
        default = handle.penalty()
        overridden = handle.penalty(attention_mask=other)
        ones = handle.penalty(attention_mask=torch.ones_like(other))
    handle.detach()
    expected = expected_sites(family)
    with torch.no_grad():
        ref_default = reference_penalty(model, expected, captured, {"attention_mask": inputs["attention_mask"]})
        ref_other = reference_penalty(model, expected, captured, {"attention_mask": other})
        ref_all = reference_penalty(model, expected, captured, {})
    for ours, ref in ((default, ref_default), (overridden, ref_other), (ones, ref_all)):
        assert abs(ours.item() - ref.item()) / ref.item() < 1e-8, (ours.item(), ref.item())
    assert abs(ref_other.item() - ref_default.item()) > 1e-6 * ref_default.item()


def test_mask_passed_positionally_is_used():
    model = _f64_model("bert")
    inputs = tiny_inputs(model)
    handle = hf_dreg.attach(model, kernels="eager")
    with torch.no_grad():
        model(**inputs)
        by_keyword = handle.penalty()
        model(inputs["input_ids"], inputs["attention_mask"])  # forward(input_ids, attention_mask, ...)
        positional = handle.penalty()
        model(inputs["input_ids"])  # and a later call without a mask does not reuse the old one
        unmasked = handle.penalty()
    handle.detach()
    assert torch.equal(by_keyword, positional), (by_keyword.item(), positional.item())
    assert not torch.allclose(by_keyword, unmasked, rtol=1e-6, atol=0)


def test_no_mask_forward_counts_every_position():
    family = "bert"
    model = _f64_model(family)
    inputs = tiny_inputs(model)
    no_mask = {"input_ids": inputs["input_ids"]}
    handle, captured, _ = _run(model, family, no_mask)
    with torch.no_grad():
        ours = handle.penalty()
    handle.detach()
    with torch.no_grad():
        ref = reference_penalty(model, expected_sites(family), captured, {})
    assert abs(ours.item() - ref.item()) / ref.item() < 1e-8


def test_vit_without_mask_counts_every_position():
    family = "vit"
    model = _f64_model(family)
    inputs = tiny_inputs(model)
    handle, captured, _ = _run(model, family, inputs)
    sums = handle.site_sums()
    positions = inputs["pixel_values"].shape[0] * ((model.config.image_size // model.config.patch_size) ** 2 + 1)
    assert [int(n) for _, _, n in sums] == [positions] * 2
    with torch.no_grad():
        ours = handle.penalty()
    handle.detach()
    with torch.no_grad():
        expected = expected_sites(family)
        per_site = [reference_per_position(model, site, captured[site.inputs[0]]) for site in expected]
        assert all(p.numel() == positions for p in per_site)
        ref = torch.stack([p.mean() for p in per_site]).mean()
    assert abs(ours.item() - ref.item()) / ref.item() < 1e-8


# ---- per_site --------------------------------------------------------------------------------------


def _per_site_by_hand(model, family, z: dict, masks: dict) -> dict[str, float]:
    """Site -> masked mean over positions of (1/m) ||J||_F^2, J the site's local Jacobian built from its own z.

    Plain: J = diag(act'(z)) W; gated: J = diag(act'(g) * u) W_g + diag(act(g)) W_u (DREG.md); act' by autograd.
    ``z`` holds each feeding Linear's output (z = W x + b, or g and u), captured by forward hooks.
    """
    modules = dict(model.named_modules())
    values = {}
    for site in expected_sites(family):
        act = modules[site.name]
        g = z[site.inputs[0]].detach().requires_grad_(True)
        with torch.enable_grad():
            a = act.forward(g)  # not act(g): that would run the hooks of the attached handle
            (slope,) = torch.autograd.grad(a.sum(), g)
        w_gate = modules[site.inputs[0]].weight.detach()  # (m, d)
        if site.kind == "plain":
            jac = slope[..., :, None] * w_gate
        else:
            u, w_up = z[site.inputs[1]], modules[site.inputs[1]].weight.detach()
            jac = (slope * u)[..., :, None] * w_gate + a.detach()[..., :, None] * w_up
        per_position = jac.pow(2).sum((-2, -1)) / jac.shape[-2]
        mask = masks[site.mask_key].to(per_position.dtype)
        values[site.name] = float((per_position * mask).sum() / mask.sum())
    return values


def _feeding_outputs(model, family):
    """Forward hooks keeping the output of every feeding Linear of the family's sites."""
    modules = dict(model.named_modules())
    store, hooks = {}, []
    for path in {p for site in expected_sites(family) for p in site.inputs}:
        hooks.append(modules[path].register_forward_hook(lambda m, a, out, path=path: store.__setitem__(path, out)))
    return store, hooks


@pytest.mark.parametrize("family", ["bert", "t5"])  # plain; gated with encoder and decoder positions
def test_per_site_values_are_each_sites_penalty_by_hand(family):
    model = _f64_model(family)
    handle = hf_dreg.attach(model, kernels="eager")
    z, hooks = _feeding_outputs(model, family)
    try:
        checked = []
        for seed in (0, 5):  # a new forward: per_site() describes it, not the previous one
            changed = _inputs(model, family, seed=seed)
            with torch.no_grad():
                model(**changed)
                values = handle.per_site()  # before penalty(): computed now
                handle.penalty()
            assert list(values) == [s.name for s in expected_sites(family)]  # keyed by site, in model order
            assert all(type(v) is float for v in values.values())
            assert handle.per_site() == values
            expected = _per_site_by_hand(model, family, z, _masks(changed))
            for name, value in expected.items():
                assert values[name] == pytest.approx(value, rel=1e-10), name
            checked.append(expected)
            # padding is excluded: counting every position would give other values at every site
            unmasked = _per_site_by_hand(model, family, z, {k: torch.ones_like(m) for k, m in _masks(changed).items()})
            assert all(unmasked[name] != pytest.approx(expected[name], rel=1e-6) for name in expected)
    finally:
        for h in hooks:
            h.remove()
        handle.detach()
    # the sites have values of their own, and the two forwards differ at every site
    assert len({round(v, 12) for v in checked[0].values()}) == len(checked[0])
    assert all(checked[0][name] != pytest.approx(checked[1][name], rel=1e-6) for name in checked[0])


def test_calling_a_site_activation_between_forwards_does_not_change_the_next_penalty():
    model = _f64_model("bert")
    inputs = tiny_inputs(model)
    with hf_dreg.attach(model, kernels="eager") as handle, torch.no_grad():
        model(**inputs)
        expected = handle.penalty()
        model.bert.encoder.layer[0].intermediate.intermediate_act_fn(torch.zeros(3, 6, 24, dtype=torch.float64))
        model(**inputs)
        again = handle.penalty()
    assert again.item() == pytest.approx(expected.item(), rel=1e-12)


# ---- reversibility ---------------------------------------------------------------------------------

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _hook_state(model):
    return {name: {attr: dict(getattr(m, attr)) for attr in _HOOK_DICTS} for name, m in model.named_modules()}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5", "llama", "modernbert"])
def test_attach_detach_is_reversible(family):
    model = tiny_model(family).eval()
    inputs = _inputs(model, family)
    with torch.no_grad():
        before_out = model(**inputs).logits  # a first forward, so lazily added hooks of transformers exist
        before_hooks = _hook_state(model)
        before_state = _state(model)
        handle = hf_dreg.attach(model, activations=_ACTIVATIONS.get(family, "gelu"), kernels="eager")
        assert _same_state(before_state, _state(model))  # nothing added to the state dict
        assert _hook_state(model) != before_hooks  # (the comparison does see our hooks)
        attached_out = model(**inputs).logits
        handle.penalty()
        handle.detach()
        assert _hook_state(model) == before_hooks
        assert _same_state(before_state, _state(model))
        after_out = model(**inputs).logits
    assert torch.equal(before_out, attached_out)
    assert torch.equal(before_out, after_out)


def test_context_manager_detaches():
    model = tiny_model("bert").eval()
    inputs = tiny_inputs(model)
    model(**inputs)
    before_hooks = _hook_state(model)
    with hf_dreg.attach(model, kernels="eager") as handle:
        model(**inputs)
        assert handle.penalty() > 0
    assert _hook_state(model) == before_hooks


def test_checkpoint_saved_while_attached_loads_without_hf_dreg(tmp_path):
    model = tiny_model("bert").eval()
    inputs = tiny_inputs(model)
    handle = hf_dreg.attach(model, kernels="eager")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert handle.penalty() > 0
    model.save_pretrained(tmp_path / "model")  # while attached
    torch.save({"inputs": inputs, "logits": logits}, tmp_path / "expected.pt")
    handle.detach()

    site_packages = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.extend({site_packages!r})  # the packages, without the .pth files that make hf_dreg importable
        try:
            import hf_dreg
        except ImportError:
            pass
        else:
            raise SystemExit("hf_dreg is importable here: " + hf_dreg.__file__)
        import torch
        from transformers import AutoModelForSequenceClassification
        model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / "model")!r}).eval()
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            logits = model(**expected["inputs"]).logits
        assert type(model).__name__ == "BertForSequenceClassification", type(model)
        assert torch.equal(logits, expected["logits"]), (logits, expected["logits"])
        print("LOADED-OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "LOADED-OK" in result.stdout


# ---- errors --------------------------------------------------------------------------------------


def test_penalty_before_any_forward_is_a_clear_error():
    model = tiny_model("bert")
    handle = hf_dreg.attach(model, kernels="eager")
    with pytest.raises(RuntimeError, match="forward"):
        handle.penalty()
    with pytest.raises(RuntimeError, match="forward"):
        handle.per_site()
    model(**tiny_inputs(model))
    assert handle.penalty() > 0
    handle.detach()
    with pytest.raises(RuntimeError, match="forward"):
        handle.penalty()


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_penalty_names_the_site(value):
    model = tiny_model("bert")
    handle = hf_dreg.attach(model, kernels="eager")
    with torch.no_grad():
        model.bert.encoder.layer[1].intermediate.dense.weight[3, 5] = value
    model(**tiny_inputs(model))
    with pytest.raises(FloatingPointError) as info:
        handle.penalty()
    message = str(info.value)
    assert "bert.encoder.layer.1.intermediate.intermediate_act_fn" in message
    assert "bert.encoder.layer.0.intermediate.intermediate_act_fn" not in message
    handle.detach()


# ---- fused kernels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_fused_matches_eager(family):
    model = tiny_model(family).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(4.0)
    inputs = _inputs(model, family)
    params = list(model.parameters())
    results = []
    for fused in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            handle = hf_dreg.attach(model, activations=_ACTIVATIONS.get(family, "gelu"), kernels="compiled" if fused else "eager")
            model(**inputs)
            p = handle.penalty()
            grads = torch.autograd.grad(p, params, allow_unused=True)
        handle.detach()
        # a fallback to eager math would make the comparison vacuous
        assert not [w for w in caught if "fused DREG kernels unavailable" in str(w.message)], [str(w.message) for w in caught]
        results.append((p.detach(), grads))
    assert not KERNELS.failed
    whole_sites = (functions._plain_site_penalty_whole, functions._plain_site_activation_whole, functions._gated_site_penalty_whole)
    assert any(key[0] in whole_sites for key in KERNELS.compiled)  # the sites really ran compiled
    (p0, g0), (p1, g1) = results
    assert torch.allclose(p0, p1, rtol=1e-6, atol=0), (p0.item(), p1.item())
    # float32 round-off, on the scale of the whole gradient (some, like BERT's key bias, are exactly 0 up to it)
    scale = max(a.abs().max().item() for a in g0 if a is not None)
    for name, a, b in zip([n for n, _ in model.named_parameters()], g0, g1):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * scale), (name, (a - b).abs().max(), a.abs().max())


def test_compiled_sites_can_be_differentiated_twice():
    """The gradient-ratio measurement and 'auto' take the penalty's gradient with retain_graph=True, then the
    step's backward runs: a compiled region with donated buffers would refuse the second pass."""
    model = tiny_model("bert").train()
    inputs = _inputs(model, "bert")
    params = [p for p in model.parameters() if p.requires_grad]
    handle = hf_dreg.attach(model, kernels="compiled")
    try:
        model(**inputs)
        p = handle.penalty()
        first = torch.autograd.grad(p, params, retain_graph=True, allow_unused=True)
        p.backward()
    finally:
        handle.detach()
    for a, param in zip(first, params):
        if a is not None:
            assert torch.allclose(a, param.grad, rtol=1e-6, atol=1e-9)
