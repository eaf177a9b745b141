"""Small training helpers for the ML-core tests (tiny models, CPU, seeded)."""

from __future__ import annotations

import lightning as L
import numpy as np
import pandas as pd

from vae_models import VAEConfig, VAEModule, infer_schema
from vae_models.data import table_loader


def train_small(
    df: pd.DataFrame, epochs: int = 20, seed: int = 0, default_kind: str | None = None, **config
) -> tuple[VAEModule, object]:
    """Fit a small VAE on `df` and return (module, schema)."""
    L.seed_everything(seed, verbose=False)
    schema = infer_schema(df, default_kind=default_kind)
    enc = schema.encode(df)
    cfg = VAEConfig(
        **{"latent_dim": 2, "hidden_dims": [32, 32], "learning_rate": 5e-3, "kl_warmup": 0.05, **config}
    )
    module = VAEModule(len(schema.numeric), schema.cat_sizes, cfg.model_dump())
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        accelerator="cpu",
    )
    trainer.fit(module, table_loader(enc, 128, shuffle=True, seed=seed))
    module.eval()
    return module, schema


def linear_table(n: int = 1500, seed: int = 0) -> pd.DataFrame:
    """x2 = 2 x1 + small noise; x3 independent noise; a category that follows the sign of x1."""
    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=n)
    return pd.DataFrame(
        {
            "x1": x1,
            "x2": 2 * x1 + 0.1 * rng.normal(size=n),
            "x3": rng.normal(size=n),
            "sign": np.where(x1 > 0, "pos", "neg"),
        }
    )
