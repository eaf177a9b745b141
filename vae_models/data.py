"""Batches sliced from in-memory tensors (no per-row Dataset, no worker processes)."""

from __future__ import annotations

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


def table_loader(table: EncodedTable, batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader over an encoded table yielding (x_num, m_num, x_cat, m_cat) batches."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        _Rows(table.tensors()),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=_as_is,
        num_workers=0,
    )
