"""Drift statistics: a shifted batch is flagged (per column and in latent space), a fresh
sample of the same distribution is not."""

import numpy as np
import pandas as pd

from pipelines.drift import drift_report, reservoir_sample
from tests.helpers import linear_table, train_small
from vae_models.bundle import ModelBundle

THRESHOLDS = dict(column_threshold=0.1, null_threshold=0.05, max_drifted_share=0.2, latent_threshold=0.1)


def _bundle():
    module, schema = train_small(linear_table(1500, seed=0), epochs=5)
    return ModelBundle(vae=module.vae, schema=schema)


def test_same_distribution_is_not_drift_and_a_shift_is():
    bundle = _bundle()
    reference, fresh = linear_table(2000, seed=1), linear_table(2000, seed=2)
    calm = drift_report(bundle, reference, fresh, **THRESHOLDS)
    assert not calm.drifted, calm.text()
    assert max(c.statistic for c in calm.columns.values()) < 0.1

    shifted = fresh.copy()
    shifted["x1"] += 1.5
    shifted["x2"] += 3.0
    shifted.loc[shifted.index[:400], "x3"] = np.nan  # 20% more nulls
    report = drift_report(bundle, reference, shifted, **THRESHOLDS)
    assert report.drifted
    assert report.columns["x1"].drifted and report.columns["x2"].drifted and report.columns["x3"].drifted
    assert report.columns["x3"].null_fraction_change > 0.15
    assert report.latent_statistic > 0.1  # the shift shows in the latent space too
    assert "x1" in report.text()


def test_new_category_counts_as_categorical_drift():
    bundle = _bundle()
    reference, current = linear_table(1000, seed=1), linear_table(1000, seed=2)
    current["sign"] = np.where(np.arange(1000) % 2 == 0, "zero", current["sign"])  # unseen level
    report = drift_report(bundle, reference, current, **THRESHOLDS)
    assert report.columns["sign"].method == "tvd"
    assert report.columns["sign"].statistic > 0.4


def test_reservoir_sample_is_bounded_uniform_and_deterministic():
    frames = [pd.DataFrame({"i": np.arange(s, s + 1000)}) for s in range(0, 10_000, 1000)]
    a = reservoir_sample(iter(frames), 500, seed=3)
    b = reservoir_sample(iter(frames), 500, seed=3)
    assert len(a) == 500 and a["i"].is_unique
    assert a.equals(b)
    assert 3000 < a["i"].mean() < 7000  # drawn from the whole stream, not its head
    assert len(reservoir_sample(iter(frames[:1]), 5000)) == 1000
