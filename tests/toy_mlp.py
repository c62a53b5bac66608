"""A small stack of MLP blocks (plain, gated, fused-gated) around a chosen activation, for exact checks."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, kind: str, act: nn.Module, d: int, m: int):
        super().__init__()
        self.kind = kind
        self.act = act
        if kind == "plain":
            self.fc1 = nn.Linear(d, m)
        elif kind == "gated":
            self.gate = nn.Linear(d, m, bias=False)
            self.up = nn.Linear(d, m, bias=False)
        else:
            self.wi = nn.Linear(d, 2 * m, bias=False)
        self.fc2 = nn.Linear(m, d)

    def forward(self, x):
        if self.kind == "plain":
            h = self.act(self.fc1(x))
        elif self.kind == "gated":
            h = self.act(self.gate(x)) * self.up(x)
        else:
            g, u = self.wi(x).chunk(2, dim=-1)
            h = self.act(g) * u
        return x + self.fc2(h)

    def local_map(self, x):
        """The site's map x -> a (one position), for jacrev."""
        if self.kind == "plain":
            return self.act(self.fc1(x))
        if self.kind == "gated":
            return self.act(self.gate(x)) * self.up(x)
        g, u = self.wi(x).chunk(2, dim=-1)
        return self.act(g) * u


class ToyModel(nn.Module):
    def __init__(self, kind: str, act_factory, d: int = 5, m: int = 7, layers: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(kind, act_factory(), d, m) for _ in range(layers))
        self.head = nn.Linear(d, 2)

    def forward(self, x, attention_mask=None):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def reference_penalty(model: ToyModel, x, mask):
    """DREG of ../shared/DREG.md computed from torch.func.jacrev of each site's local map."""
    values = []
    for block in model.blocks:
        flat = x.reshape(-1, x.shape[-1])
        jac = torch.vmap(torch.func.jacrev(block.local_map))(flat)  # (positions, m, d)
        m = jac.shape[1]
        per_position = (jac**2).sum(dim=(1, 2)) / m
        w = mask.reshape(-1).to(per_position.dtype)
        values.append((per_position * w).sum() / w.sum())
        x = block(x)
    return torch.stack(values).mean()
