"""What the MLP sites of each tiny family are, written out by hand, and an independent DREG reference.

Nothing here reads hf_dreg's Site objects: the expected sites and the reference penalty are built from
the model's own modules, so that the tests compare hf_dreg against something it did not produce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Expected:
    name: str  # the activation module
    kind: str  # plain / gated / fused_gated
    inputs: tuple[str, ...]  # feeding layer(s): (fc,), (gate, up) or (fused,)
    output: str  # the projection back to the residual width
    mask_key: str | None  # which forward input masks this site's positions


def _stack(prefix, kind, act, inputs, output, mask_key="attention_mask", layers=2):
    return [
        Expected(
            name=f"{prefix}.{i}.{act}",
            kind=kind,
            inputs=tuple(f"{prefix}.{i}.{p}" for p in inputs),
            output=f"{prefix}.{i}.{output}",
            mask_key=mask_key,
        )
        for i in range(layers)
    ]


def expected_sites(family: str) -> list[Expected]:
    bert_like = ("intermediate.intermediate_act_fn", ("intermediate.dense",), "output.dense")
    if family in ("bert", "roberta", "electra"):
        return _stack(f"{family}.encoder.layer", "plain", *bert_like)
    if family == "deberta-v2":
        return _stack("deberta.encoder.layer", "plain", *bert_like)
    if family == "distilbert":
        return _stack("distilbert.transformer.layer", "plain", "ffn.activation", ("ffn.lin1",), "ffn.lin2")
    if family == "gpt2":
        return _stack("transformer.h", "plain", "mlp.act", ("mlp.c_fc",), "mlp.c_proj")
    if family in ("vit", "deit"):
        return _stack(f"{family}.layers", "plain", "mlp.activation_fn", ("mlp.fc1",), "mlp.fc2", mask_key=None)
    if family == "t5":
        def t5(part, layer, mask_key):
            d = f"layer.{layer}.DenseReluDense"
            return _stack(f"{part}.block", "gated", f"{d}.act", (f"{d}.wi_0", f"{d}.wi_1"), f"{d}.wo", mask_key=mask_key)

        return t5("encoder", 1, "attention_mask") + t5("decoder", 2, "decoder_attention_mask")
    if family in ("llama", "gemma"):
        return _stack("model.layers", "gated", "mlp.act_fn", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")
    if family == "modernbert":
        return _stack("model.layers", "fused_gated", "mlp.act", ("mlp.Wi",), "mlp.Wo")
    raise KeyError(family)


# ---- the reference -------------------------------------------------------------------------------


def capture_inputs(model, expected: list[Expected]):
    """Forward pre-hooks storing the input x of every site's (first) feeding layer; returns (store, handles)."""
    modules = dict(model.named_modules())
    store, handles = {}, []
    for site in expected:
        path = site.inputs[0]

        def hook(module, args, path=path):
            store[path] = args[0]

        handles.append(modules[path].register_forward_pre_hook(hook))
    return store, handles


def local_map(model, site: Expected):
    """The site's map x -> a for one position, from the model's own modules."""
    modules = dict(model.named_modules())
    act = modules[site.name]
    if site.kind == "plain":
        fc = modules[site.inputs[0]]
        return lambda x: act(fc(x))
    if site.kind == "gated":
        gate, up = modules[site.inputs[0]], modules[site.inputs[1]]
        return lambda x: act(gate(x)) * up(x)
    fused = modules[site.inputs[0]]

    def fused_map(x):
        g, u = fused(x).chunk(2, dim=-1)
        return act(g) * u

    return fused_map


def reference_per_position(model, site: Expected, x: torch.Tensor) -> torch.Tensor:
    """(1/m) ||d a / d x||_F^2 at every position of x (shape x.shape[:-1]), by torch.func.jacrev."""
    flat = x.reshape(-1, x.shape[-1])
    jac = torch.vmap(torch.func.jacrev(local_map(model, site)))(flat)  # (positions, m, d)
    return ((jac**2).sum(dim=(1, 2)) / jac.shape[1]).reshape(x.shape[:-1])


def reference_penalty(model, expected: list[Expected], captured: dict, masks: dict) -> torch.Tensor:
    """Mean over sites of the masked mean over positions of the per-position value.

    ``masks`` maps a mask key to a mask; a site whose key is absent counts every position.
    """
    values = []
    for site in expected:
        x = captured[site.inputs[0]]
        per_position = reference_per_position(model, site, x)
        mask = masks.get(site.mask_key) if site.mask_key else None
        if mask is None:
            values.append(per_position.mean())
        else:
            w = mask.to(per_position.dtype)
            assert w.shape == per_position.shape, (site.name, w.shape, per_position.shape)
            values.append((per_position * w).sum() / w.sum())
    return torch.stack(values).mean()
