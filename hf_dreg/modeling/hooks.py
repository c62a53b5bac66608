"""Attach DREG to a model with forward hooks, read the penalty, detach.

Hooks only: nothing is added to the state dict and no module is replaced, so a checkpoint saved
while attached is a vanilla transformers checkpoint and ``detach()`` restores the model exactly.

Each feeding layer's hook reads its weight rows inside its own forward (where FSDP has
materialised them); each activation's hook computes the per-position penalty of its site with the
custom autograd Functions of :mod:`hf_dreg.ops.functions`. A forward pre-hook on the model resets the
record and remembers the attention masks it was called with. On a model sharded with FSDP2 two identity
nodes keep the penalty's backward inside each sharded unit's own (:mod:`hf_dreg.modeling.sharding`); DeepSpeed
ZeRO-3's partitioned weights are refused.
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref

import torch
from torch import Tensor, nn

from ..ops.activations import spec_for
from ..ops.functions import (
    gated_site_penalty_from_weights,
    plain_site_activation_from_weight,
    plain_site_penalty_from_weight,
)
from ..ops.kernels import resolve_kernels
from ..ops.low_rank import (
    LowRankRows,
    gated_site_penalty_low_rank,
    plain_site_activation_low_rank,
    plain_site_penalty_low_rank,
    weight_gated_row_stats,
    weight_row_stats,
)
from .fused_mlps import fused_mlp_spec, is_transformers_gated_mlp, unfused_activation
from .layers import penalty_weight_rows
from .positions import position_masks
from .sharding import Tie, check_zero3, first_grad_tensor, fsdp2_owner, gate
from .sites import FUSED_MLP, GATED, PLAIN, Site, find_sites

# model -> its attached handle: a model carries at most one DREG attachment at a time
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, DREGHandle]" = weakref.WeakKeyDictionary()


def attached_handle(model: nn.Module) -> "DREGHandle | None":
    """The DREGHandle attached to ``model`` (or to one of its submodules' sites), if any."""
    for module in model.modules():
        handle = _ATTACHED.get(module)
        if handle is not None:
            return handle
    return None


class PositionMismatchError(ValueError):
    """A site's positions do not match the mask of the batch (virtual tokens, a custom mask)."""


class _Pieces:
    """What one site has collected so far in the current forward pass."""

    __slots__ = ("g", "a", "u", "w_gate", "w_up")

    def __init__(self):
        self.g = self.a = self.u = self.w_gate = self.w_up = None


def _chunk(t: Tensor, chunk) -> Tensor:
    return t if chunk is None else t.chunk(chunk[1], dim=-1)[chunk[0]]


def _weight_chunk(w: Tensor | LowRankRows, chunk) -> Tensor | LowRankRows:
    if chunk is None:
        return w
    return w.chunk(chunk[0], chunk[1]) if isinstance(w, LowRankRows) else w.chunk(chunk[1], dim=0)[chunk[0]]


class DREGHandle:
    """The attached penalty: ``penalty()`` after a forward, ``per_site()``, ``detach()``."""

    def __init__(self, model: nn.Module, sites: list[Site], kernels: str = "eager", fused: bool | None = None):
        existing = attached_handle(model)
        if existing is not None:
            raise RuntimeError(
                f"{type(model).__name__} already has DREG attached ({existing}). Detach it first with "
                "handle.detach() on the handle attach() returned (or hf_dreg.modeling.hooks.attached_handle(model).detach()); "
                "a DREG trainer attaches its own during train(), evaluate() and predict() and detaches it afterwards."
            )
        _refuse_virtual_tokens(model)
        self.model = model
        self.sites = sites
        if fused is not None:  # the deprecated boolean: compiled or eager
            kernels = "compiled" if fused else "eager"
        device = next((p.device for p in model.parameters() if not p.is_meta), None)
        self.kernels = resolve_kernels(kernels, device)
        if self.kernels == "triton":  # fails at attach, not at the first forward
            from ..ops import triton_functions  # triton is optional: imported only for this family

            triton_functions.check_device(device)
            self._triton = triton_functions
        self.fused = self.kernels == "compiled"
        modules = dict(model.named_modules())
        self._layers = {path: modules[path] for site in sites for path in (site.gate, site.up) if path}
        check_zero3(model)
        self._first_weight = next((p for m in self._layers.values() for p in m.parameters()), None)
        # FSDP2: the units holding the feeding layers' weights, found again whenever a module of the feeding
        # layers' ancestry changes class (fully_shard does that), so that sharding after attach is seen
        self._ancestry = self._ancestry_of(modules)
        self._ancestry_key = None
        self._site_owners: dict[str, tuple] = {}  # site -> the FSDP2 units its weights belong to
        self._owner_hooks = []
        self._pending: dict = {}  # FSDP2 unit -> the sites recorded in its current forward
        self._read = None  # under FSDP2: each weight the penalty reads passes a Gate anchored at the layer's output
        self._records: dict[str, Tensor] = {}
        self._masks: dict[str, Tensor] = {}
        self._recording = True
        self._last: dict[str, Tensor] = {}
        self._pieces = {site.name: _Pieces() for site in sites}
        self._hooks = []
        self._forwards = []  # (module, its own instance forward or None): the MLP forwards replaced, restored by detach()
        self._specs = {
            site.name: fused_mlp_spec(modules[site.name]) if site.kind == FUSED_MLP else spec_for(modules[site.name]) for site in sites
        }
        roles: dict[str, list] = {}
        for site in sites:
            roles.setdefault(site.gate, []).append((site, "gate"))
            if site.kind != PLAIN:
                roles.setdefault(site.up, []).append((site, "up"))
            if site.kind == FUSED_MLP:
                self._replace_forward(modules[site.name], self._fused_mlp_forward(site, modules))
            elif (mlp := self._product_mlp(site, modules)) is not None:  # its activation runs inside the new forward
                self._replace_forward(mlp, self._fused_mlp_forward(site, modules, act=modules[site.name]))
            else:
                self._hooks.append(modules[site.name].register_forward_hook(self._activation_hook(site)))
        for path, entries in roles.items():
            # prepend: under ZeRO-3 read the weight before DeepSpeed's own post-forward hook frees it
            self._hooks.append(modules[path].register_forward_hook(self._layer_hook(entries), prepend=True))
        try:  # to find masks passed positionally, e.g. model(input_ids, attention_mask)
            self._signature = inspect.signature(model.forward)
        except (TypeError, ValueError):
            self._signature = None
        self._hooks.append(model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        self._sync_sharding()
        _ATTACHED[model] = self

    @property
    def attached(self) -> bool:
        """False once ``detach()`` has run."""
        return bool(self._hooks)

    def _replace_forward(self, module: nn.Module, forward) -> None:
        """Give ``module`` (this instance only) ``forward``; ``detach()`` puts back what it had."""
        self._forwards.append((module, module.__dict__.get("forward")))
        module.forward = forward

    # ---- sharded models -------------------------------------------------------------------------

    def _ancestry_of(self, modules: dict) -> tuple[list, dict]:
        """(every module on the path from the model to a feeding layer, feeding layer -> its chain upwards)."""
        chains, seen = {}, {}
        for path in self._layers:
            parts = path.split(".") if path else []
            chain = [modules[".".join(parts[:i])] for i in range(len(parts), -1, -1)]
            chains[path] = chain
            for m in chain:
                seen[id(m)] = m
        return list(seen.values()), chains

    def _sync_sharding(self) -> None:
        """Find the FSDP2 units again if ``fully_shard`` changed a module since the last call (a tuple of classes:
        microseconds per forward on an unsharded model), and refuse ZeRO-3 weights partitioned after attach."""
        if self._first_weight is not None and hasattr(self._first_weight, "ds_id"):  # deepspeed.initialize after attach
            check_zero3(self.model)
        candidates, chains = self._ancestry
        key = tuple(type(m) for m in candidates)
        if key == self._ancestry_key:
            return
        self._ancestry_key = key
        for h in self._owner_hooks:
            h.remove()
        self._owner_hooks, self._site_owners, self._pending = [], {}, {}
        owners = {path: fsdp2_owner(chain) for path, chain in chains.items()}
        for site in self.sites:
            found = [owners[p] for p in (site.gate, site.up) if p and owners[p] is not None]
            if found:
                self._site_owners[site.name] = tuple(dict.fromkeys(found))
        units = list(dict.fromkeys(u for us in self._site_owners.values() for u in us))
        for unit in units:
            # prepended: before FSDP2's own post-forward hook, which registers its pre-backward hook on the outputs
            self._owner_hooks.append(unit.register_forward_hook(self._unit_hook, prepend=True))
        self._read = self._gated_read if units else None

    def _gated_read(self, anchor):
        return lambda w: gate(w, anchor)

    def _unit_hook(self, module, args, output):
        """The end of an FSDP2 unit's forward: its output and the penalties recorded in it through one :class:`Tie`."""
        names = self._pending.pop(module, None)
        if not names:
            return None
        names = [n for n in dict.fromkeys(names) if n in self._records]
        found, put = first_grad_tensor(output)
        if found is None or not names or not torch.is_grad_enabled():
            return None
        tied = Tie.apply(found, *(self._records[n] for n in names))
        for name, p in zip(names, tied[1:]):
            self._records[name] = p
        return put(tied[0])

    # ---- hooks ----------------------------------------------------------------------------------

    def _on_model_call(self, module, args, kwargs):
        self._sync_sharding()
        self._records = {}
        self._last = {}
        self._pieces = {site.name: _Pieces() for site in self.sites}  # nothing left from a call outside a forward
        self._pending = {}
        self._recording = True
        if args and self._signature is not None:
            try:
                kwargs = {**self._signature.bind_partial(*args).arguments, **kwargs}
            except TypeError:
                pass
        self._masks = position_masks(kwargs)

    def _layer_hook(self, entries):
        def hook(module, args, output):
            w = penalty_weight_rows(module) if self._read is None else penalty_weight_rows(module, self._read(output))
            for site, role in entries:
                pieces = self._pieces[site.name]
                if role == "gate":
                    pieces.w_gate = _weight_chunk(w, site.gate_chunk)
                else:
                    pieces.w_up = _weight_chunk(w, site.up_chunk)
                    pieces.u = _chunk(output, site.up_chunk)
                self._maybe_fire(site)

        return hook

    def _activation_hook(self, site: Site):
        def hook(module, args, output):
            pieces = self._pieces[site.name]
            pieces.g, pieces.a = args[0], output
            return self._maybe_fire(site, at_activation=True)

        return hook

    def _product_mlp(self, site: Site, modules: dict) -> nn.Module | None:
        """The MLP of a gated site whose forward the triton family replaces, computing the product f(g) * u in the
        site's node: transformers' own gated MLP (:func:`~hf_dreg.modeling.fused_mlps.is_transformers_gated_mlp`)
        whose parts are this site's. None for any other site (its activation is hooked)."""
        if self.kernels != "triton" or site.kind != GATED or site.gate_chunk or site.up_chunk or not self._specs[site.name].kernel:
            return None
        mlp = modules.get(site.name.rpartition(".")[0])
        if mlp is None or not is_transformers_gated_mlp(mlp):
            return None
        parts = {"act_fn": site.name, "gate_proj": site.gate, "up_proj": site.up, "down_proj": site.output}
        return mlp if all(getattr(mlp, attr) is modules.get(path) for attr, path in parts.items()) else None

    def _fused_mlp_forward(self, site: Site, modules: dict, act=None):
        """The forward of a gated MLP whose product is one call: down(f(gate(x)) * up(x)), the product and the
        site's penalty from one node of hf_dreg's kernels (the gate's and up's weights read in their hooks).

        Liger Kernel's fused MLPs (``act`` None: torch's function of the activation), and under the triton family
        transformers' own gated MLPs (``act``: the MLP's activation module, which gets no hook then)."""
        gate, up, down = modules[site.gate], modules[site.up], modules[site.output]
        spec = self._specs[site.name]
        act = unfused_activation(spec) if act is None else act

        def forward(x):
            g, u = gate(x), up(x)
            pieces = self._pieces[site.name]
            if pieces.w_gate is None or pieces.w_up is None:  # the layers' hooks did not run (a hook-less call): no penalty
                return down(act(g) * u)
            if self._direct_kernels() and g.dtype == u.dtype:  # the product in the model's dtype
                source, stats = self._site_stats(site, pieces.w_gate, pieces.w_up)
                h, p = self._triton.gated_site(g, None, u, stats, spec, source=source, product=True)
            else:
                a = act(g)
                h = a * u
                low_rank = isinstance(pieces.w_gate, LowRankRows) or isinstance(pieces.w_up, LowRankRows)
                compute = gated_site_penalty_low_rank if low_rank else gated_site_penalty_from_weights
                p = compute(g, a, u, pieces.w_gate, pieces.w_up, spec, self.fused)
            self._record(site, p)
            return down(h)

        return forward

    def _direct_kernels(self) -> bool:
        """Whether this pass calls the Triton kernels directly: the triton family, outside a torch.compile trace.

        Inside the model's own compiled graph (``torch_compile=True``) the sites are the same autograd Functions
        with torch operators, traced into that graph (inductor generates and fuses their kernels there, and the
        whole graph is one call): no graph break, no per-site host cost to remove.
        """
        return self.kernels == "triton" and not torch.compiler.is_compiling()

    def _site_stats(self, site, w_gate, w_up=None) -> tuple[str, tuple]:
        """(source, inputs) of a site node's row statistics (:mod:`hf_dreg.ops.triton_functions`): the dense
        weights; for LoRA-fed weights on frozen bases the factors (the statistics from them and the bases inside
        the site's node); on trained bases the statistics."""
        t = self._triton
        weights = (w_gate,) if w_up is None else (w_gate, w_up)
        if not any(isinstance(w, LowRankRows) for w in weights):
            return t.WEIGHTS, weights
        if any((w.base if isinstance(w, LowRankRows) else w).requires_grad for w in weights):  # a trained base: the general route
            stats = weight_row_stats(w_gate) if w_up is None else weight_gated_row_stats(w_gate, w_up)
            return t.STATS, (stats,) if w_up is None else stats
        return t.LOW_RANK, t.low_rank_inputs(w_gate, w_up)

    def _record(self, site: Site, p: Tensor) -> None:
        self._pieces[site.name] = _Pieces()
        if self._recording:  # off while gradient checkpointing recomputes a layer in backward
            self._records[site.name] = p
            for unit in self._site_owners.get(site.name, ()):
                self._pending.setdefault(unit, []).append(site.name)

    def _maybe_fire(self, site: Site, at_activation: bool = False) -> Tensor | None:
        """Compute the site's p once its pieces are in; returns the activation's new output, if any.

        A plain site whose weight is read before its activation runs (the usual order) is computed in
        the activation's hook as one node that is also the activation's output (same values), so that
        one backward pass gives z both gradients.
        """
        pieces = self._pieces[site.name]
        if pieces.g is None or pieces.w_gate is None:
            return None
        if site.kind != PLAIN and pieces.u is None:
            return None
        spec = self._specs[site.name]
        with_output = at_activation and isinstance(pieces.a, Tensor)
        if self._direct_kernels():
            output, p = self._fire_triton(site, pieces, spec, with_output)
        else:
            output, p = self._fire_torch(site, pieces, spec, with_output)
        self._record(site, p)
        return output

    def _fire_triton(self, site, pieces, spec, with_output):
        """One node per site and direction, its passes Triton kernels called directly."""
        if site.kind == PLAIN:
            source, stats = self._site_stats(site, pieces.w_gate)
            out = self._triton.plain_site(pieces.g, pieces.a, stats, spec, source=source, with_output=with_output)
            return out if with_output else (None, out)
        source, stats = self._site_stats(site, pieces.w_gate, pieces.w_up)
        return None, self._triton.gated_site(pieces.g, pieces.a, pieces.u, stats, spec, source=source)

    def _fire_torch(self, site, pieces, spec, with_output):
        """The row statistics and the site's penalty: one compiled region each way (``compiled``), or eager."""
        if site.kind == PLAIN:
            low_rank = isinstance(pieces.w_gate, LowRankRows)
            if with_output:
                compute = plain_site_activation_low_rank if low_rank else plain_site_activation_from_weight
                return compute(pieces.g, pieces.a, pieces.w_gate, spec, self.fused)
            compute = plain_site_penalty_low_rank if low_rank else plain_site_penalty_from_weight
            return None, compute(pieces.g, pieces.a, pieces.w_gate, spec, self.fused)
        low_rank = isinstance(pieces.w_gate, LowRankRows) or isinstance(pieces.w_up, LowRankRows)
        compute = gated_site_penalty_low_rank if low_rank else gated_site_penalty_from_weights
        return None, compute(pieces.g, pieces.a, pieces.u, pieces.w_gate, pieces.w_up, spec, self.fused)

    # ---- reading the penalty --------------------------------------------------------------------

    def site_sums(self, attention_mask: Tensor | None = None, masks: dict[str, Tensor] | None = None) -> list[tuple[Site, Tensor, Tensor]]:
        """(site, sum of p over valid positions, number of valid positions) for the last forward.

        The valid positions are those of ``masks`` (``hf_dreg.positions.position_masks`` of the batch;
        by default those of the inputs the model was called with), with ``attention_mask`` overriding
        that key. A mask whose shape is not the site's positions is an error, never silently ignored.
        Stops recording, so that layers recomputed by gradient checkpointing during backward are
        not counted twice; the next forward of the model starts a new record.
        """
        found = {}
        for sites, totals, count in self.site_groups(attention_mask, masks):
            for site, total in zip(sites, totals.unbind(0)):
                found[site.name] = (site, total, count)
        return [found[site.name] for site in self.sites if site.name in found]

    def site_groups(self, attention_mask: Tensor | None = None, masks: dict[str, Tensor] | None = None) -> list[tuple[list[Site], Tensor, Tensor]]:
        """:meth:`site_sums` as groups of sites of one kind of position, shape and dtype, summed together (a few
        operators per step, not per site): (sites, their sums as one (len(sites),) tensor, the positions' count)."""
        self._recording = False
        masks = dict(self._masks if masks is None else masks)
        if attention_mask is not None:
            masks["attention_mask"] = attention_mask
        groups: dict = {}
        for site in self.sites:
            p = self._records.get(site.name)
            if p is None:
                continue
            mask = masks.get(site.mask_key) if site.mask_key else None
            if mask is not None and tuple(mask.shape) != tuple(p.shape):
                raise PositionMismatchError(
                    f"DREG site {site.name!r} computed {tuple(p.shape)} positions, but the batch's {site.mask_key} "
                    f"has shape {tuple(mask.shape)}. The model adds or drops positions the mask does not describe "
                    "(PEFT prompt/prefix tuning's virtual tokens, a custom 4-D mask): DREG cannot tell padding from "
                    "tokens there. Use LoRA instead of prompt tuning, or pass a 2-D mask of the positions the model computes."
                )
            key = (site.mask_key, mask is not None, tuple(p.shape), p.dtype, p.device)
            groups.setdefault(key, ([], [], mask))[0].append(site)
            groups[key][1].append(p)
        out = []
        for (_, _, shape, dtype, device), (sites, ps, mask) in groups.items():
            stacked = torch.stack(ps) if len(ps) > 1 else ps[0].unsqueeze(0)
            if mask is None:
                totals = stacked.reshape(len(ps), -1).sum(-1)
                count = torch.full((), float(math.prod(shape)), dtype=dtype, device=device)
            else:
                weights = mask.to(device=device, dtype=dtype)
                totals = (stacked * weights).reshape(len(ps), -1).sum(-1)
                count = weights.sum()
            out.append((sites, totals, count))
        return out

    def penalty(self, attention_mask: Tensor | None = None, num_positions=None) -> Tensor:
        """Mean over sites of the per-site DREG value (lambda not applied) for the last forward.

        Padding positions are excluded with ``attention_mask`` (by default the mask the model was
        called with). Without ``num_positions`` each site's value is its mean over this batch's valid
        positions.

        ``num_positions``: the valid positions of the whole optimizer step (all its micro-batches, and all
        processes under DDP), from :func:`hf_dreg.count_positions`, as its dict (one count per kind of
        position) or as one number when every site has the same kind. Each site's sum over this
        micro-batch's positions is then divided by that count, so the micro-batches' values **add up** to
        the penalty of the step's whole batch: the exact recipe for gradient accumulation in your own loop
        (docs/usage.md, "Your own training loop"). Sites whose positions no mask describes (image patches)
        keep their local mean.
        """
        groups = self.site_groups(attention_mask)
        if not groups:
            raise RuntimeError(
                "No DREG value recorded: call the model (forward) after attach() and before penalty(), "
                "and check that the attached sites run in that forward."
            )
        shares = [totals / divisor for (_, totals, _), divisor in zip(groups, self._divisors(groups, num_positions))]
        values = torch.cat(shares) if len(shares) > 1 else shares[0]
        self._last = dict(zip((site.name for sites, _, _ in groups for site in sites), values.detach().unbind(0)))
        total = values.mean()
        check_finite(total, self._last)
        return total

    @staticmethod
    def _divisors(groups, num_positions) -> list[Tensor]:
        """The divisor of every group of :meth:`site_groups` (its sites share their kind of position) under
        ``num_positions`` (see :meth:`penalty`): the local count where it is None or has no count of that kind."""
        if num_positions is None:
            return [local.clamp_min(1) for _, _, local in groups]
        kinds = {sites[0].mask_key for sites, _, _ in groups if sites[0].mask_key}
        if not isinstance(num_positions, dict):
            if len(kinds) > 1:
                raise ValueError(
                    f"num_positions is one number, but the sites count positions of {len(kinds)} kinds ({sorted(kinds)}): "
                    "pass the dict hf_dreg.count_positions(batches) returns."
                )
            num_positions = {kind: num_positions for kind in kinds}
        divisors = []
        for sites, totals, local in groups:
            key = sites[0].mask_key
            if key is None or key not in num_positions:
                if key in kinds and key not in num_positions:
                    raise ValueError(
                        f"num_positions has no count of {key!r} positions (it has {sorted(num_positions)}), "
                        f"which site {sites[0].name!r} needs: count them with hf_dreg.count_positions(batches)."
                    )
                divisors.append(local.clamp_min(1))
                continue
            value = num_positions[key]
            if not isinstance(value, Tensor) and value < 1:  # a number is checked; a tensor is not read back (no device sync)
                raise ValueError(f"num_positions[{key!r}] must be >= 1 (the step's valid positions), got {value}.")
            divisors.append(torch.as_tensor(value, dtype=totals.dtype, device=totals.device).clamp_min(1))
        return divisors

    def per_site(self) -> dict[str, float]:
        """Site name -> DREG value of the last forward's ``penalty()`` (computed now if it was not called).

        Raises the same RuntimeError as ``penalty()`` when no forward has been recorded.
        """
        if not self._last:
            self.penalty()
        return {site.name: float(self._last[site.name]) for site in self.sites if site.name in self._last}

    def detach(self) -> None:
        """Remove every hook: the model is exactly as it was before attach()."""
        for h in self._hooks + self._owner_hooks:
            h.remove()
        self._hooks, self._owner_hooks, self._site_owners, self._pending, self._read = [], [], {}, {}, None
        for module, own in reversed(self._forwards):
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own
        self._forwards = []
        self._records = {}
        self._masks = {}
        self._last = {}
        self._pieces = {site.name: _Pieces() for site in self.sites}
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()

    def __repr__(self) -> str:
        kinds = {}
        for site in self.sites:
            kinds[site.kind] = kinds.get(site.kind, 0) + 1
        return f"DREGHandle({len(self.sites)} sites: {kinds})"


def _refuse_virtual_tokens(model: nn.Module) -> None:
    """PEFT prompt tuning / P-tuning prepend virtual tokens that no attention mask describes: refuse them by name."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return
    for name, config in configs.items():
        kind = str(getattr(config, "peft_type", ""))
        if getattr(config, "is_prompt_learning", False) and "PREFIX_TUNING" not in kind:
            raise ValueError(
                f"DREG does not support PEFT {kind.split('.')[-1].lower()} (adapter {name!r}): its virtual tokens add "
                "positions to every MLP that no attention mask describes, so DREG cannot tell them from padding. "
                "Use LoRA (peft.LoraConfig), or prefix tuning, which adds no positions to the MLPs."
            )


def check_finite(total: Tensor, per_site: dict[str, Tensor]) -> None:
    """A clear error for a NaN/inf penalty (eagerly; inside a torch.compile graph it would break the graph
    and sync the device, so there the loss's own NaN is what the user sees)."""
    if torch.compiler.is_compiling() or bool(torch.isfinite(total)):
        return
    bad = [name for name, v in per_site.items() if not math.isfinite(float(v))]
    raise FloatingPointError(
        f"The DREG penalty is not finite at site(s) {bad}: the activations or weights there overflowed "
        "(NaN/inf). Lower the learning rate or dreg_lambda, or use bf16 instead of fp16."
    )


def attach(model: nn.Module, activations="gelu", exclude_modules=None, kernels: str = "auto", inputs=None, fused: bool | None = None) -> DREGHandle:
    """Find the model's MLP activation sites and attach the DREG penalty to them.

    Returns a :class:`DREGHandle`. ``kernels`` is the kernel family of the penalty's passes (the same
    values from every family):

    - ``"auto"`` (default): ``"triton"`` on a CUDA device, ``"compiled"`` elsewhere;
    - ``"triton"``: one Triton kernel per site and direction, called directly (on a CPU only under
      ``TRITON_INTERPRET=1``, for tests);
    - ``"compiled"``: torch.compile's fused kernels, one compiled region per site and direction (what
      makes DREG nearly free on a CPU; compiled once per machine, falling back to eager math with a
      warning where the machine cannot compile);
    - ``"eager"``: plain torch operators.

    ``fused`` is the deprecated boolean of earlier versions (True: ``"compiled"``, False: ``"eager"``).
    """
    if fused is not None:
        warnings.warn("attach(fused=...) is deprecated: use kernels='compiled' or kernels='eager'.", FutureWarning, stacklevel=2)
    check_zero3(model)  # before the probe forward, which ZeRO-3's hooks would confuse
    sites = find_sites(model, activations=activations, exclude_modules=exclude_modules, inputs=inputs)
    return DREGHandle(model, sites, kernels=kernels, fused=fused)
