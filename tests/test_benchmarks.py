"""The quality benchmark's data: real shipped tables, labels kept out of the features."""

import numpy as np

from benchmarks.datasets import MAX_ROWS, anomaly_construction, load_tables
from benchmarks.quality import design


def test_ten_real_tables_from_two_packages_without_label_leaks():
    tables = load_tables(0)
    assert len(tables) >= 10 and len({t.name for t in tables}) == len(tables)
    assert len({t.source.split()[0] for t in tables}) >= 2
    for t in tables:
        assert 100 <= len(t.features) <= MAX_ROWS
        assert len(t.label) == len(t.features)
        assert "label" not in t.features.columns
        assert not any(c.lower() in ("id", "rownames") for c in t.features.columns), t.name  # no identifiers
        assert (t.label == t.anomaly_class).any(), t.name
    kinds = {t.name: bool(t.categorical_columns) for t in tables}
    assert any(kinds.values()) and not all(kinds.values())  # mixed-type and purely numeric tables
    assert any(t.features.isna().any().any() for t in tables)  # at least one has real nulls


def test_anomaly_construction_keeps_the_rare_class_rare():
    table = next(t for t in load_tables(0) if t.name == "breast_cancer")
    df, y = anomaly_construction(table, seed=0)
    assert len(df) == len(y)
    assert 0 < y.mean() <= 0.06
    assert y.sum() < (table.label == table.anomaly_class).sum()


def test_design_standardises_with_full_table_statistics():
    table = next(t for t in load_tables(0) if t.name == "penguins")
    d = design(table)
    num = d.matrix[:, : len(d.num_cols)]
    assert np.allclose(np.nanmean(num, axis=0), 0, atol=1e-9)
    assert np.isnan(num).any()  # real nulls stay missing for the imputers
    onehot = d.matrix[:, len(d.num_cols) :]
    assert set(np.unique(onehot)) <= {0.0, 1.0}
