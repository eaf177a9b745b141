"""Training: a fit interrupted mid-way resumes from its last checkpoint (what a task retry does)."""

import pytest
from lightning.pytorch.callbacks import Callback

from pipelines import training
from pipelines.config import load_settings
from tests.conftest import small_params
from vae_models import infer_schema


class CrashAtEpoch(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("worker lost")


def test_interrupted_fit_resumes_from_last_checkpoint(tmp_path, flights):
    settings = load_settings(small_params(tmp_path, train={"max_epochs": 4, "patience": 10}))
    train_df, val_df = flights.iloc[:2400], flights.iloc[2400:]
    schema = infer_schema(train_df, key="rownames")
    ckpt = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="worker lost"):
        training.fit(train_df, val_df, schema, settings, checkpoint_dir=ckpt, callbacks=[CrashAtEpoch(2)])
    assert (ckpt / "last.ckpt").exists()
    resumed = training.fit(train_df, val_df, schema, settings, checkpoint_dir=ckpt)
    assert [int(r["epoch"]) for r in resumed.history] == [2, 3]  # epochs 0-1 were not redone
    fresh = training.fit(train_df, val_df, schema, settings, checkpoint_dir=tmp_path / "other")
    assert [int(r["epoch"]) for r in fresh.history] == [0, 1, 2, 3]
