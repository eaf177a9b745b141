"""Batches sliced from in-memory tensors (no per-row Dataset, no worker processes), the held-out
cells that model selection scores, and the step budget of a fit."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vae_models.schema import EncodedTable


class _Rows(Dataset):
    """Rows of several aligned tensors, fetched a whole batch at a time via `__getitems__`."""

    def __init__(self, tensors: tuple[torch.Tensor, ...]):
        self.tensors = tensors

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    def __getitem__(self, i):  # pragma: no cover - the loader always fetches whole batches
        return tuple(t[i] for t in self.tensors)

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices)
        return tuple(t[idx] for t in self.tensors)


def _as_is(batch):
    return batch


def tensor_loader(
    tensors: tuple[torch.Tensor, ...], batch_size: int, *, shuffle: bool, seed: int = 0
) -> DataLoader:
    """A DataLoader yielding whole batches of aligned tensors."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        _Rows(tensors),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=_as_is,
        num_workers=0,
    )


def table_loader(table: EncodedTable, batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader over an encoded table yielding (x_num, m_num, x_cat, m_cat) batches."""
    return tensor_loader(table.tensors(), batch_size, shuffle=shuffle, seed=seed)


def seeded_subset(rows: np.ndarray, max_rows: int, seed: int = 0) -> np.ndarray:
    """`rows` as they are, or a seeded sample of `max_rows` of them in their order when there are more."""
    if len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
    return rows


@dataclass
class HeldOut:
    """A table with some observed cells hidden (`visible`), and which cells those are."""

    visible: EncodedTable  # the same values; masks without the held-out cells
    h_num: np.ndarray  # (N, n_num) float32, 1 = held out
    h_cat: np.ndarray  # (N, n_cat) float32

    @property
    def cells(self) -> int:
        return int(self.h_num.sum() + self.h_cat.sum())

    def sample_rows(self, max_rows: int, seed: int = 0) -> np.ndarray:
        """Indices of up to `max_rows` rows that hold a held-out cell, a seeded sample when there
        are more: the rows each validation scores."""
        return seeded_subset(np.flatnonzero((self.h_num.sum(1) + self.h_cat.sum(1)) > 0), max_rows, seed)

    def loader(self, rows: np.ndarray, batch_size: int) -> DataLoader:
        """Batches (x_num, m_num, x_cat, m_cat, h_num, h_cat) of `rows` (from `sample_rows`)."""
        v = self.visible
        arrays = (v.x_num, v.m_num, v.x_cat, v.m_cat, self.h_num, self.h_cat)
        return tensor_loader(tuple(torch.as_tensor(a[rows]) for a in arrays), batch_size, shuffle=False)


def hold_out_cells(table: EncodedTable, fraction: float, seed: int = 0) -> HeldOut:
    """Hide a seeded `fraction` of the observed cells: every row still trains on the rest, and
    the hidden cells score imputation (the model's target) for early stopping and selection.
    A row keeps at least one visible cell."""
    rng = np.random.default_rng(seed)
    h_num = (rng.random(table.m_num.shape) < fraction).astype(np.float32) * table.m_num
    h_cat = (rng.random(table.m_cat.shape) < fraction).astype(np.float32) * table.m_cat
    observed = table.m_num.sum(1) + table.m_cat.sum(1)
    emptied = (observed - h_num.sum(1) - h_cat.sum(1)) < 1
    h_num[emptied] = 0.0
    h_cat[emptied] = 0.0
    visible = EncodedTable(table.x_num, table.m_num - h_num, table.x_cat, table.m_cat - h_cat)
    return HeldOut(visible, h_num, h_cat)


@dataclass
class Budget:
    """How long a fit trains: batch size, step budget and how often it validates."""

    batch_size: int
    max_steps: int
    steps_per_epoch: int
    val_every: int  # training batches between validations: a whole number of epochs when >= one

    def trainer_args(self) -> dict[str, int | float]:
        """Lightning's `val_check_interval` / `check_val_every_n_epoch` for `val_every`."""
        if self.val_every < self.steps_per_epoch:
            return {"val_check_interval": self.val_every, "check_val_every_n_epoch": 1}
        return {"val_check_interval": 1.0, "check_val_every_n_epoch": self.val_every // self.steps_per_epoch}


TRAIN_DRAWS = 2**24  # decoder draws (steps x batch x K) an `auto` importance-weighted fit spends
MAX_TRAIN_K = 8
DEFAULT_MIN_STEPS = 4000  # the step budget's floor (train.min_steps' default)


def training_samples(budget: Budget, setting: int | str, architecture: str = "mlp") -> int:
    """K samples per row of the training bound: `setting` as it is, or for `auto` the most, up
    to MAX_TRAIN_K, that keep the table's default budget (DEFAULT_MIN_STEPS or one pass of
    `budget.batch_size` rows, whichever is longer) x batch x K within TRAIN_DRAWS: up to ~32k
    training rows (batches up to 512) 8, up to ~4M rows 4, at 8M rows 2. K is sized by the
    table, not by how long the fit trains: a longer budget (train.min_steps, the impute preset)
    keeps the table's K and costs that much more. A conv network keeps the ELBO (1): its
    decoder costs K times as much per step (unmeasured). The MIWAE bound imputes better than
    the ELBO and ranks anomalies worse (measured: README "The models"); K=16 imputed no
    better than 8."""
    if setting != "auto":
        return int(setting)
    if architecture != "mlp":
        return 1
    draws = max(DEFAULT_MIN_STEPS, budget.steps_per_epoch) * budget.batch_size
    return max(1, min(MAX_TRAIN_K, TRAIN_DRAWS // draws))


def plan_budget(
    n_rows: int,
    *,
    batch_size: int | None = None,
    max_steps: int | None = None,
    min_steps: int = DEFAULT_MIN_STEPS,
    max_epochs: int | None = None,
    max_batch: int = 1024,
    min_batch: int = 32,
    validations: int = 40,
) -> Budget:
    """The step budget of a fit on `n_rows` training rows.

    Unless given: batch size = rows/32 rounded down to a power of two, within [min_batch,
    max_batch] (569 rows -> 32, 5,000 -> 128, 1M -> 1024); step budget = min_steps or one pass,
    whichever is longer (a 10M-row table gets one pass at batch 1024, a small one ~4,000 steps
    of small batches), capped at `max_epochs` passes. It validates about `validations` times
    (at least every 50 steps apart; on a small table every few epochs, on a large one within
    an epoch), and at least 4 times when the budget is a few epochs.
    """
    n_rows = max(n_rows, 1)
    if batch_size is None:
        batch_size = 2 ** int(math.floor(math.log2(max(n_rows / 32, 1))))
        batch_size = min(max(batch_size, min_batch), max_batch)
    batch_size = min(batch_size, n_rows)
    steps_per_epoch = math.ceil(n_rows / batch_size)
    steps = max_steps if max_steps is not None else max(min_steps, steps_per_epoch)
    if max_epochs is not None:
        steps = min(steps, max_epochs * steps_per_epoch)
    target = max(50, steps // validations)
    if target < steps_per_epoch:
        val_every = target
    else:
        epochs = math.ceil(steps / steps_per_epoch)
        val_every = steps_per_epoch * max(1, min(target // steps_per_epoch, epochs // 4))
    return Budget(batch_size, steps, steps_per_epoch, val_every)
