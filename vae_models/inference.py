"""The math behind the batch jobs: impute, anomaly score, embed, sample.

All functions take a trained `TabularVAE` and an `EncodedTable`, work in mini-batches under
`torch.no_grad()` on the model's device and return numpy arrays in row order. The sampling
ones draw from `generator` when given (thread-safe, reproducible per call), else the global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vae_models.schema import EncodedTable
from vae_models.vae import TableBatch, TabularVAE


def _batches(vae: TabularVAE, table: EncodedTable, batch_size: int) -> Iterator[TableBatch]:
    device = next(vae.parameters()).device
    tensors = table.tensors()
    for start in range(0, max(len(table), 1), batch_size):  # an empty table still yields shapes
        yield TableBatch(*(t[start : start + batch_size].to(device) for t in tensors))


def _run(
    vae: TabularVAE, table: EncodedTable, batch_size: int, fn: Callable[[TableBatch], tuple]
) -> tuple[np.ndarray, ...]:
    was_training = vae.training
    vae.eval()
    parts: list[tuple] = []
    with torch.no_grad():
        for batch in _batches(vae, table, batch_size):
            parts.append(tuple(t.cpu().numpy() for t in fn(batch)))
    vae.train(was_training)
    return tuple(np.concatenate(cols, axis=0) for cols in zip(*parts, strict=True))


def log_marginal(
    vae: TabularVAE,
    table: EncodedTable,
    k: int = 64,
    batch_size: int = 4096,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """Importance-sampled estimate of log p(x_observed) per row (K samples)."""

    def fn(batch: TableBatch):
        log_w, *_ = vae.log_weights(batch, k, generator)
        return (torch.logsumexp(log_w, 0) - math.log(k),)

    return _run(vae, table, batch_size, fn)[0]


@dataclass
class AnomalyScores:
    score: np.ndarray  # (N,) -log p(x) per observed cell; higher = more anomalous
    per_column: np.ndarray  # (N, n_cells) posterior-weighted -log p(x_ij | z); 0 where missing


def anomaly_scores(
    vae: TabularVAE,
    table: EncodedTable,
    k: int = 16,
    batch_size: int = 4096,
    generator: torch.Generator | None = None,
) -> AnomalyScores:
    """-log p(x) by importance sampling, divided by the row's observed cells, plus per-column parts."""

    def fn(batch: TableBatch):
        log_w, cell_ll, _, _ = vae.log_weights(batch, k, generator)
        n_obs = batch.mask.sum(-1).clamp(min=1.0)
        score = -(torch.logsumexp(log_w, 0) - math.log(k)) / n_obs
        weights = torch.softmax(log_w, 0).unsqueeze(-1)
        return score, -(weights * cell_ll).sum(0)

    score, per_column = _run(vae, table, batch_size, fn)
    return AnomalyScores(score, per_column)


@dataclass
class Imputation:
    x_num: np.ndarray  # (N, n_num) standardised; observed cells kept
    num_spread: np.ndarray  # (N, n_num) predictive std of each imputed numeric cell; 0 if observed
    x_cat: np.ndarray  # (N, n_cat) codes; observed cells kept
    cat_confidence: np.ndarray  # (N, n_cat) probability of the chosen level; 1 if observed


def impute(
    vae: TabularVAE,
    table: EncodedTable,
    k: int = 32,
    batch_size: int = 4096,
    generator: torch.Generator | None = None,
) -> Imputation:
    """Fill missing cells with the self-normalised importance-sampling estimate of E[x_miss | x_obs].

    Numerics get the weighted mean of the decoder means (and the mixture's std as spread);
    categoricals the level with the highest weighted probability, never the unknown slot.
    """

    def fn(batch: TableBatch):
        log_w, _, decoded, _ = vae.log_weights(batch, k, generator)
        w = torch.softmax(log_w, 0)  # (k, B)
        wn = w.unsqueeze(-1)
        mean = (wn * decoded.num_mu).sum(0)
        second = (wn * (decoded.num_mu**2 + decoded.num_logvar.exp())).sum(0)
        spread = (second - mean**2).clamp(min=0).sqrt()
        m_num = batch.m_num.bool()
        x_num = torch.where(m_num, batch.x_num, mean)
        spread = torch.where(m_num, torch.zeros_like(spread), spread)
        codes, conf = [], []
        for j, logits in enumerate(decoded.cat_logits):
            probs = (wn * F.softmax(logits, -1)).sum(0)[:, :-1]  # drop the unknown slot
            best_p, best = probs.max(-1)
            observed = batch.m_cat[:, j].bool()
            codes.append(torch.where(observed, batch.x_cat[:, j], best))
            conf.append(torch.where(observed, torch.ones_like(best_p), best_p))
        n = batch.x_num.shape[0]
        x_cat = torch.stack(codes, -1) if codes else batch.x_cat.new_zeros((n, 0))
        cat_conf = torch.stack(conf, -1) if conf else batch.x_num.new_zeros((n, 0))
        return x_num, spread, x_cat, cat_conf

    return Imputation(*_run(vae, table, batch_size, fn))


def embed(vae: TabularVAE, table: EncodedTable, batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and log-variance of z per row."""

    def fn(batch: TableBatch):
        post = vae.inference(batch)
        return post.mu, post.logvar

    return _run(vae, table, batch_size, fn)


def reconstruct(
    vae: TabularVAE, table: EncodedTable, batch_size: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """Decode each row's posterior mean: (standardised numerics, category codes)."""

    def fn(batch: TableBatch):
        decoded = vae.generative(vae.inference(batch).mu)
        codes = [logits[:, :-1].argmax(-1) for logits in decoded.cat_logits]
        x_cat = torch.stack(codes, -1) if codes else batch.x_cat.new_zeros((batch.x_cat.shape[0], 0))
        return decoded.num_mu, x_cat

    return _run(vae, table, batch_size, fn)


def sample(vae: TabularVAE, n: int, seed: int = 0, batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Draw n rows from the prior: z ~ N(0, I), x ~ p(x|z). Returns (standardised numerics, codes)."""
    device = next(vae.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    was_training = vae.training
    vae.eval()
    nums, cats = [], []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            z = torch.randn((m, vae.config.latent_dim), generator=gen).to(device)
            decoded = vae.generative(z)
            eps = torch.randn(decoded.num_mu.shape, generator=gen).to(device)
            nums.append((decoded.num_mu + eps * torch.exp(0.5 * decoded.num_logvar)).cpu().numpy())
            codes = [
                torch.multinomial(F.softmax(logits[:, :-1], -1).cpu(), 1, generator=gen).squeeze(-1)
                for logits in decoded.cat_logits
            ]
            cats.append(torch.stack(codes, -1).numpy() if codes else np.zeros((m, 0), dtype=np.int64))
    vae.train(was_training)
    return np.concatenate(nums), np.concatenate(cats)
