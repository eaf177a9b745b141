"""Encoder and decoder networks: MLPs for tables, small CNNs for image-shaped numeric columns."""

from __future__ import annotations

import math

import torch
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


def _check_image(image_shape: tuple[int, int], channels: list[int]) -> tuple[int, int]:
    h, w = image_shape
    factor = 2 ** len(channels)
    if h % factor or w % factor:
        raise ValueError(
            f"image shape {h}x{w} must be divisible by 2**len(conv_channels) = {factor}; "
            f"use fewer conv_channels"
        )
    return h // factor, w // factor


class ConvEncoder(nn.Module):
    """(B, H*W) pixel values and their mask -> (B, out_dim), through stride-2 convolutions.

    The two input channels are the masked pixels and the mask, so missing pixels are visible
    as missing; `extra_dim` columns (e.g. one-hot categoricals) join after the convolutions.
    """

    def __init__(
        self, image_shape: tuple[int, int], channels: list[int], hidden: int, out_dim: int, extra_dim: int = 0
    ):
        super().__init__()
        self.image_shape = tuple(image_shape)
        h, w = _check_image(self.image_shape, channels)
        layers: list[nn.Module] = []
        width = 2
        for c in channels:
            layers += [nn.Conv2d(width, c, 3, stride=2, padding=1), nn.SiLU()]
            width = c
        self.conv = nn.Sequential(*layers, nn.Flatten())
        self.head = mlp(width * h * w + extra_dim, [hidden], out_dim)

    def forward(self, pixels: torch.Tensor, mask: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        img = torch.stack([pixels * mask, mask], dim=1).view(-1, 2, *self.image_shape)
        return self.head(torch.cat([self.conv(img), extra], dim=-1))


class ConvDecoder(nn.Module):
    """z (..., B, L) -> per-pixel (mean, raw log-variance) (..., B, 2*H*W) plus `extra_dim` outputs."""

    def __init__(
        self,
        latent_dim: int,
        image_shape: tuple[int, int],
        channels: list[int],
        hidden: int,
        extra_dim: int = 0,
    ):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.h0, self.w0 = _check_image(self.image_shape, channels)
        rev = channels[::-1]
        self.c0 = rev[0]
        self.fc = mlp(latent_dim, [hidden], rev[0] * self.h0 * self.w0 + extra_dim)
        self.extra_dim = extra_dim
        layers: list[nn.Module] = []
        width = rev[0]
        for c in rev[1:]:
            layers += [nn.ConvTranspose2d(width, c, 4, stride=2, padding=1), nn.SiLU()]
            width = c
        layers += [nn.ConvTranspose2d(width, 2, 4, stride=2, padding=1)]
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        h = self.fc(z.reshape(-1, z.shape[-1]))
        n_img = h.shape[-1] - self.extra_dim
        img = self.deconv(torch.nn.functional.silu(h[:, :n_img]).view(-1, self.c0, self.h0, self.w0))
        pixels = math.prod(self.image_shape)
        out = torch.cat([img[:, 0].reshape(-1, pixels), img[:, 1].reshape(-1, pixels), h[:, n_img:]], dim=-1)
        return out.view(*lead, out.shape[-1])
