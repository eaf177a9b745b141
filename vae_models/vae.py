"""The tabular VAE: inference q(z|x) -> generative p(x|z) -> loss, and its LightningModule.

Missing cells are masked out of the likelihood and zeroed (with their mask as an extra input)
in the encoder, so a row with missing cells is encoded from what it has. With K > 1 samples
per row the objective is the importance-weighted bound (IWAE; MIWAE when cells are missing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vae_models.config import VAEConfig
from vae_models.likelihoods import (
    bounded_logvar,
    categorical_log_prob,
    diagonal_normal_log_prob,
    gaussian_log_prob,
    kl_to_standard_normal,
    standard_normal_log_prob,
)
from vae_models.networks import ConvDecoder, ConvEncoder, mlp


class TableBatch(NamedTuple):
    """A batch of encoded rows (see `vae_models.schema.EncodedTable`)."""

    x_num: torch.Tensor
    m_num: torch.Tensor
    x_cat: torch.Tensor
    m_cat: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """(B, n_cells) observation mask in the model's cell order."""
        return torch.cat([self.m_num, self.m_cat], dim=-1)


class Posterior(NamedTuple):
    mu: torch.Tensor
    logvar: torch.Tensor


class Decoded(NamedTuple):
    """Decoder parameters; leading dims (..., B)."""

    num_mu: torch.Tensor
    num_logvar: torch.Tensor
    cat_logits: list[torch.Tensor]


@dataclass
class LossOutput:
    """Named outputs of one loss evaluation; per-row tensors have shape (B,)."""

    loss: torch.Tensor
    bound: torch.Tensor  # ELBO (K=1) or IWAE bound (K>1), unweighted: an estimate of log p(x)
    recon: torch.Tensor  # E_q log p(x|z) over observed cells
    kl: torch.Tensor  # KL(q(z|x) || p(z)) (closed form)


class TabularVAE(nn.Module):
    """Pure-torch VAE for mixed numeric and categorical columns."""

    def __init__(self, n_num: int, cat_sizes: list[int], config: VAEConfig):
        super().__init__()
        self.n_num = n_num
        self.cat_sizes = list(cat_sizes)
        self.config = config
        in_dim = 2 * n_num + sum(cat_sizes)
        out_dim = 2 * n_num + sum(cat_sizes)
        if config.architecture == "conv":
            h, w = config.image_shape
            if n_num != h * w:
                raise ValueError(
                    f"architecture=conv with image_shape {h}x{w} needs {h * w} numeric (pixel) "
                    f"columns; the table has {n_num}"
                )
            hidden = config.hidden_dims[0]
            self.encoder = ConvEncoder(
                (h, w), config.conv_channels, hidden, 2 * config.latent_dim, sum(cat_sizes)
            )
            self.decoder = ConvDecoder(
                config.latent_dim, (h, w), config.conv_channels, hidden, sum(cat_sizes)
            )
        else:
            self.encoder = mlp(in_dim, config.hidden_dims, 2 * config.latent_dim, config.dropout)
            self.decoder = mlp(config.latent_dim, config.hidden_dims[::-1], out_dim, config.dropout)
        skip = config.linear_skip and config.architecture == "mlp"
        self.decoder_skip = nn.Linear(config.latent_dim, out_dim) if skip else None
        floor = config.num_logvar_min
        if floor is not None and len(floor) != n_num:
            raise ValueError(f"model.num_logvar_min has {len(floor)} values; the table has {n_num} numerics")
        low = [
            config.logvar_min if f is None else min(max(config.logvar_min, f), config.logvar_max - 1.0)
            for f in floor or [None] * n_num
        ]
        # derived from the config, so not part of the weights: old bundles load unchanged
        self.register_buffer("num_logvar_low", torch.tensor(low, dtype=torch.float32), persistent=False)

    @property
    def train_k(self) -> int:
        """Samples per row of the training bound: `n_importance`, resolved from the budget by a
        fit (`data.training_samples`); a network built without one (`auto`) trains the ELBO."""
        k = self.config.n_importance
        return 1 if k == "auto" else k

    @property
    def n_cells(self) -> int:
        return self.n_num + len(self.cat_sizes)

    def _one_hot(self, batch: TableBatch) -> torch.Tensor:
        parts = [batch.x_num.new_zeros((batch.x_num.shape[0], 0))]
        for j, size in enumerate(self.cat_sizes):
            parts.append(F.one_hot(batch.x_cat[:, j], size).to(batch.x_num.dtype) * batch.m_cat[:, j : j + 1])
        return torch.cat(parts, dim=-1)

    def encoder_input(self, batch: TableBatch) -> torch.Tensor:
        """The MLP encoder's input: masked numerics, their mask, masked one-hot categoricals."""
        return torch.cat([batch.x_num * batch.m_num, batch.m_num, self._one_hot(batch)], dim=-1)

    def inference(self, batch: TableBatch, hide: float = 0.0) -> Posterior:
        """q(z|x): a diagonal Gaussian with bounded log-variance.

        `hide` > 0 (training only) hides that share of observed cells from the encoder, so it
        learns to encode rows with missing cells; the likelihood still scores every observed cell.
        """
        if hide > 0:
            keep_num = (torch.rand_like(batch.m_num) >= hide).to(batch.m_num.dtype)
            keep_cat = (torch.rand_like(batch.m_cat) >= hide).to(batch.m_cat.dtype)
            batch = TableBatch(batch.x_num, batch.m_num * keep_num, batch.x_cat, batch.m_cat * keep_cat)
        if self.config.architecture == "conv":
            h = self.encoder(batch.x_num, batch.m_num, self._one_hot(batch))
        else:
            h = self.encoder(self.encoder_input(batch))
        mu, raw = h.chunk(2, dim=-1)
        return Posterior(mu, bounded_logvar(raw, self.config.logvar_min, self.config.logvar_max))

    def generative(self, z: torch.Tensor) -> Decoded:
        """p(x|z): Gaussian heads for numerics, softmax heads for categoricals."""
        h = self.decoder(z)
        if self.decoder_skip is not None:
            h = h + self.decoder_skip(z)
        n = self.n_num
        num_mu, raw = h[..., :n], h[..., n : 2 * n]
        logvar = bounded_logvar(raw, self.num_logvar_low, self.config.logvar_max)
        logits = list(torch.split(h[..., 2 * n :], self.cat_sizes, dim=-1)) if self.cat_sizes else []
        return Decoded(num_mu, logvar, logits)

    def cell_log_likelihood(self, batch: TableBatch, decoded: Decoded) -> torch.Tensor:
        """(..., B, n_cells) log p(x_ij | z); exactly 0 for missing cells."""
        parts = [gaussian_log_prob(batch.x_num, decoded.num_mu, decoded.num_logvar)]
        for j, logits in enumerate(decoded.cat_logits):
            parts.append(categorical_log_prob(batch.x_cat[:, j], logits).unsqueeze(-1))
        ll = torch.cat(parts, dim=-1)
        return torch.where(batch.mask.bool(), ll, torch.zeros_like(ll))

    def sample_posterior(
        self, post: Posterior, k: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(k, B, L) reparameterised draws from q(z|x) (from `generator`, else the global RNG)."""
        std = torch.exp(0.5 * post.logvar)
        eps = torch.randn(
            (k, *post.mu.shape), device=post.mu.device, dtype=post.mu.dtype, generator=generator
        )
        return post.mu + std * eps

    def log_weights(
        self, batch: TableBatch, k: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Decoded, Posterior]:
        """Importance weights log p(x,z)/q(z|x) (k, B), per-cell log-likelihoods, decoder output."""
        post = self.inference(batch)
        z = self.sample_posterior(post, k, generator)
        decoded = self.generative(z)
        cell_ll = self.cell_log_likelihood(batch, decoded)
        log_w = (
            cell_ll.sum(-1) + standard_normal_log_prob(z) - diagonal_normal_log_prob(z, post.mu, post.logvar)
        )
        return log_w, cell_ll, decoded, post

    def loss(
        self,
        batch: TableBatch,
        kl_weight: float = 1.0,
        k: int | None = None,
        hide: float = 0.0,
        trim: float = 0.0,
    ) -> LossOutput:
        """Negative (beta-weighted) ELBO for K=1, negative IWAE bound for K>1, averaged over the
        rows; `trim` > 0 averages over the rows whose loss per observed cell is at or below the
        batch's (1 - trim) quantile instead (robust training: the worst-fitting rows are left out)."""
        k = k or self.train_k
        post = self.inference(batch, hide)
        kl = kl_to_standard_normal(post.mu, post.logvar)
        z = self.sample_posterior(post, k)
        recon_k = self.cell_log_likelihood(batch, self.generative(z)).sum(-1)  # (k, B)
        recon = recon_k.mean(0)
        if k == 1:
            per_row, bound = -(recon - kl_weight * kl), recon - kl
        else:
            log_prior_ratio = standard_normal_log_prob(z) - diagonal_normal_log_prob(z, post.mu, post.logvar)
            log_k = math.log(k)
            per_row = -(torch.logsumexp(recon_k + kl_weight * log_prior_ratio, 0) - log_k)
            bound = torch.logsumexp(recon_k + log_prior_ratio, 0) - log_k
        return LossOutput(loss=_trimmed_mean(per_row, batch.mask, trim), bound=bound, recon=recon, kl=kl)


def _trimmed_mean(per_row: torch.Tensor, mask: torch.Tensor, trim: float) -> torch.Tensor:
    """The mean of `per_row`, or with `trim` > 0 the mean over the rows whose value per observed
    cell is at or below the (1 - trim) quantile of the batch's (linearly interpolated: with
    distinct values ceil(trim x (B - 1)) of B rows are left out, at least one)."""
    if trim <= 0 or per_row.shape[0] < 2:
        return per_row.mean()
    per_cell = (per_row / mask.sum(-1).clamp(min=1.0)).detach()
    keep = (per_cell <= torch.quantile(per_cell, 1.0 - trim)).to(per_row.dtype)
    return (per_row * keep).sum() / keep.sum()
