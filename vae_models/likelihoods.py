"""Per-type output heads: log-likelihoods of observed cells under the decoder's parameters."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2.0 * math.pi)


def bounded_logvar(raw: torch.Tensor, low: float | torch.Tensor, high: float) -> torch.Tensor:
    """Squash an unbounded output into [low, high] smoothly, so variances never blow up; `low`
    may be a per-column tensor (broadcast over the last dimension)."""
    return low + (high - low) * torch.sigmoid(raw)


def gaussian_log_prob(x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(x; mu, exp(logvar))."""
    return -0.5 * (LOG_2PI + logvar + (x - mu) ** 2 * torch.exp(-logvar))


def categorical_log_prob(codes: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[code]; `logits` (..., B, C), `codes` (B,) broadcast over leading dims."""
    log_p = F.log_softmax(logits, dim=-1)
    index = codes.expand(log_p.shape[:-1]).unsqueeze(-1)
    return log_p.gather(-1, index).squeeze(-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dimension."""
    return (-0.5 * (LOG_2PI + z**2)).sum(-1)


def diagonal_normal_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dimension."""
    return gaussian_log_prob(z, mu, logvar).sum(-1)


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per row, in closed form."""
    return 0.5 * (mu**2 + torch.exp(logvar) - 1.0 - logvar).sum(-1)
