"""The math behind the batch jobs: impute, anomaly score, embed, sample.

All functions take a trained `TabularVAE` and an `EncodedTable`, work in mini-batches under
`torch.no_grad()` on the model's device and return numpy arrays in row order. The sampling
ones draw from `generator` when given (thread-safe, reproducible per call), else the global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from vae_models.data import HeldOut, seeded_subset
from vae_models.schema import ColumnSpec, EncodedTable, TableSchema
from vae_models.vae import Decoded, TableBatch, TabularVAE


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
    cat_mean: np.ndarray  # (N, n_cat) probability-weighted mean of numeric levels; NaN otherwise
    ess: np.ndarray  # (N,) effective sample size of the importance weights

    def to_frame(self, schema: TableSchema) -> pd.DataFrame:
        """Point estimates in the table's units: the posterior mean of every numeric cell, and
        of every float column stored as levels (a 0/1 column gets P(1), not the likelier level);
        the likeliest level of the other categoricals."""
        out = schema.decode(self.x_num, self.x_cat)
        for j, spec in enumerate(schema.categorical):
            if mean_imputed(spec):
                imputed = ~np.isnan(self.cat_mean[:, j])
                out[spec.name] = out[spec.name].astype("float64").where(~imputed, self.cat_mean[:, j])
        return out


def mean_imputed(spec: ColumnSpec) -> bool:
    """A categorical column whose levels are numbers in a float column: imputed by its mean."""
    return spec.dtype.startswith("float") and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in spec.categories
    )


def _log1p_mean(mu: torch.Tensor, logvar: torch.Tensor, w: torch.Tensor, center, scale) -> torch.Tensor:
    """Standardised value whose decoded form is E[x] for log1p columns: with y = log1p(x) ~
    N(c + s mu, s^2 sigma^2) per draw, E[x] = sum_k w_k (exp(c + s mu_k + s^2 sigma_k^2 / 2) - 1)."""
    log_y = center + scale * mu + 0.5 * scale**2 * logvar.exp()
    mean_x = (w * torch.expm1(log_y.clamp(max=700.0))).sum(0).clamp(min=0.0)
    return (torch.log1p(mean_x) - center) / scale


def _weighted_estimates(
    log_w: torch.Tensor, decoded: Decoded
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """From importance log-weights (k, B) and the decoder's outputs: the normalised weights, the
    weighted numeric means (B, n_num) and each categorical's weighted level probabilities (B,
    levels), the unknown slot dropped: the self-normalised estimates `impute` and
    `heldout_metrics` share."""
    w = torch.softmax(log_w, 0)
    wn = w.unsqueeze(-1)
    mean = (wn * decoded.num_mu).sum(0)
    probs = [(wn * F.softmax(logits, -1)).sum(0)[:, :-1] for logits in decoded.cat_logits]
    return w, mean, probs


def impute(
    vae: TabularVAE,
    table: EncodedTable,
    k: int = 32,
    batch_size: int = 4096,
    generator: torch.Generator | None = None,
    schema: TableSchema | None = None,
) -> Imputation:
    """Fill missing cells with the self-normalised importance-sampling estimate of E[x_miss | x_obs].

    Numerics get the weighted mean of the decoder means (and the mixture's std as spread);
    categoricals the level with the highest weighted probability, never the unknown slot.
    Given the `schema`, log1p columns marked `lognormal_mean` (see `choose_log1p_estimates`)
    get the mean in original units (not expm1 of the mean log), numeric means stay within the
    range seen in training (the mean of any distribution on that support does; a heavy
    log-normal tail would not) and numeric-level categoricals get their probability-weighted
    mean (`cat_mean`).
    """
    num_specs = schema.numeric if schema else []
    log1p = [j for j, spec in enumerate(num_specs) if spec.transform == "log1p" and spec.lognormal_mean]
    ranges = [(j, spec.standardised_range()) for j, spec in enumerate(num_specs)]
    ranges = [(j, r) for j, r in ranges if r is not None]
    cat_levels = [
        torch.tensor([float(v) for v in spec.categories]) if mean_imputed(spec) else None
        for spec in (schema.categorical if schema else [])
    ]

    def fn(batch: TableBatch):
        log_w, _, decoded, _ = vae.log_weights(batch, k, generator)
        w, mean, cat_probs = _weighted_estimates(log_w, decoded)  # w: (k, B)
        ess = 1.0 / (w**2).sum(0)
        second = (w.unsqueeze(-1) * (decoded.num_mu**2 + decoded.num_logvar.exp())).sum(0)
        spread = (second - mean**2).clamp(min=0).sqrt()
        for j in log1p:
            spec = num_specs[j]
            mean[:, j] = _log1p_mean(
                decoded.num_mu[..., j], decoded.num_logvar[..., j], w, spec.center, spec.scale
            )
        for j, (lo, hi) in ranges:  # a column's mean lies within its support
            bounds = torch.tensor([lo, hi], dtype=mean.dtype, device=mean.device)  # beyond float32: +-inf
            mean[:, j] = mean[:, j].clamp(bounds[0], bounds[1])
        m_num = batch.m_num.bool()
        x_num = torch.where(m_num, batch.x_num, mean)
        spread = torch.where(m_num, torch.zeros_like(spread), spread)
        codes, conf, means = [], [], []
        for j, probs in enumerate(cat_probs):
            best_p, best = probs.max(-1)
            observed = batch.m_cat[:, j].bool()
            codes.append(torch.where(observed, batch.x_cat[:, j], best))
            conf.append(torch.where(observed, torch.ones_like(best_p), best_p))
            levels = cat_levels[j] if j < len(cat_levels) else None
            if levels is None:
                means.append(torch.full_like(best_p, math.nan))
            else:
                expected = (probs @ levels.to(probs)) / probs.sum(-1).clamp(min=1e-12)
                means.append(torch.where(observed, torch.full_like(best_p, math.nan), expected))
        n = batch.x_num.shape[0]
        x_cat = torch.stack(codes, -1) if codes else batch.x_cat.new_zeros((n, 0))
        cat_conf = torch.stack(conf, -1) if conf else batch.x_num.new_zeros((n, 0))
        cat_mean = torch.stack(means, -1) if means else batch.x_num.new_zeros((n, 0))
        return x_num, spread, x_cat, cat_conf, cat_mean, ess

    return Imputation(*_run(vae, table, batch_size, fn))


class HeldOutSums(NamedTuple):
    """Sums over a batch of rows with held-out cells (see `heldout_metrics`)."""

    nll: torch.Tensor  # -log p(x_held | x_visible)
    cells: torch.Tensor  # held cells
    sq: torch.Tensor  # squared error of the numeric posterior mean, standardised units
    n_num: torch.Tensor  # held numeric cells
    wrong: torch.Tensor  # held categorical cells whose likeliest level is wrong
    n_cat: torch.Tensor  # held categorical cells
    ess: torch.Tensor  # effective sample size of the importance weights, summed over rows


def choose_log1p_estimates(
    vae: TabularVAE, held: HeldOut, schema: TableSchema, k: int = 16, max_rows: int = 20_000, seed: int = 0
) -> TableSchema:
    """The schema with each log1p column's point estimate chosen on its held-out cells: the
    log-normal mean, exp(mu + sigma^2/2) - 1 per draw (the best guess in squared error when the
    model's spread is right), or expm1 of the mean log (robust when a zero-inflated or
    heavy-tailed column makes that spread wrong), whichever imputes them with the smaller
    squared error in the column's own units."""
    log1p = [j for j, spec in enumerate(schema.numeric) if spec.transform == "log1p"]
    rows = np.flatnonzero(held.h_num[:, log1p].sum(1) > 0) if log1p else np.array([], dtype=int)
    if rows.size == 0:
        return schema
    rows = seeded_subset(rows, max_rows, seed)
    v = held.visible
    table = EncodedTable(v.x_num[rows], v.m_num[rows], v.x_cat[rows], v.m_cat[rows])
    truth = schema.decode(table.x_num, table.x_cat)
    errors = {}
    for flag in (True, False):
        trial = _with_log1p_means(schema, dict.fromkeys(log1p, flag))
        gen = torch.Generator(device=next(vae.parameters()).device).manual_seed(seed)  # paired draws
        filled = impute(vae, table, k=k, generator=gen, schema=trial).to_frame(trial)
        for j in log1p:
            name, hidden = schema.numeric[j].name, held.h_num[rows, j] > 0
            diff = filled[name].to_numpy("float64")[hidden] - truth[name].to_numpy("float64")[hidden]
            errors[j, flag] = float(np.mean(diff**2)) if hidden.any() else math.inf
    return _with_log1p_means(schema, {j: errors[j, True] < errors[j, False] for j in log1p})


def _with_log1p_means(schema: TableSchema, flags: dict[int, bool]) -> TableSchema:
    numeric = schema.numeric
    chosen = {numeric[j].name: flag for j, flag in flags.items()}
    columns = [replace(c, lognormal_mean=chosen[c.name]) if c.name in chosen else c for c in schema.columns]
    return replace(schema, columns=columns)


def heldout_metrics(
    vae: TabularVAE, batch: TableBatch, h_num: torch.Tensor, h_cat: torch.Tensor, k: int
) -> HeldOutSums:
    """Scores of held-out cells (mask `h_num`/`h_cat`, hidden from `batch`) given the visible ones.

    The likelihood is the importance-sampled ratio log sum_k w_k p(x_held|z_k) - log sum_k w_k,
    and the point estimates are the weighted means: the same estimator that `impute` uses.
    """
    log_w, _, decoded, _ = vae.log_weights(batch, k)
    held = TableBatch(batch.x_num, h_num, batch.x_cat, h_cat)
    ll_held = vae.cell_log_likelihood(held, decoded).sum(-1)  # (k, B)
    cond = torch.logsumexp(log_w + ll_held, 0) - torch.logsumexp(log_w, 0)
    w, mean, cat_probs = _weighted_estimates(log_w, decoded)
    sq = (((mean - batch.x_num) ** 2) * h_num).sum()
    wrong = batch.x_num.new_zeros(())
    for j, probs in enumerate(cat_probs):
        best = probs.argmax(-1)
        wrong = wrong + ((best != batch.x_cat[:, j]).to(h_cat.dtype) * h_cat[:, j]).sum()
    n_num, n_cat = h_num.sum(), h_cat.sum()
    ess = (1.0 / (w**2).sum(0)).sum()
    return HeldOutSums(-cond.sum(), n_num + n_cat, sq, n_num, wrong, n_cat, ess)


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
