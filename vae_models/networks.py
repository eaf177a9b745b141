"""Encoder and decoder networks for tables."""

from __future__ import annotations

from torch import nn


def mlp(in_dim: int, hidden_dims: list[int], out_dim: int, dropout: float = 0.0) -> nn.Sequential:
    """A multilayer perceptron: Linear -> LayerNorm -> SiLU (-> Dropout) per hidden layer."""
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden_dims:
        layers += [nn.Linear(width, h), nn.LayerNorm(h), nn.SiLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)
