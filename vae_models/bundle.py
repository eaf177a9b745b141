"""A trained model on disk: weights (a plain state dict), schema and config as JSON.

Loading uses `torch.load(weights_only=True)`: nothing pickled, nothing executed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vae_models.config import VAEConfig
from vae_models.schema import TableSchema
from vae_models.vae import TabularVAE

WEIGHTS = "weights.pt"
SCHEMA = "schema.json"
META = "model.json"


@dataclass
class ModelBundle:
    """Everything needed to score a table: the network, its schema and calibration data."""

    vae: TabularVAE
    schema: TableSchema
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. anomaly threshold

    @property
    def config(self) -> VAEConfig:
        return self.vae.config


def save_bundle(bundle: ModelBundle, path: str | Path) -> Path:
    """Write the bundle to `path` atomically (a temp folder renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    umask = os.umask(0o022)  # mkdtemp's folder is private (0700): give it what mkdir would
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        state = {k: v.detach().cpu() for k, v in bundle.vae.state_dict().items()}
        torch.save(state, tmp / WEIGHTS)
        (tmp / SCHEMA).write_text(json.dumps(bundle.schema.to_dict(), indent=2, default=str))
        meta = {
            "config": bundle.vae.config.model_dump(),
            "n_num": bundle.vae.n_num,
            "cat_sizes": bundle.vae.cat_sizes,
            "extra": bundle.extra,
        }
        (tmp / META).write_text(json.dumps(meta, indent=2))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def legacy_config(config: dict[str, Any]) -> dict[str, Any]:
    """A stored config as today's `VAEConfig` reads it: bundles written before the linear skip
    path existed have none, and their epoch-based KL warm-up only mattered in training."""
    config = dict(config)
    if "kl_warmup_epochs" in config:
        config.pop("kl_warmup_epochs")
        config.setdefault("linear_skip", False)
    return config


def load_bundle(path: str | Path, map_location: str | torch.device = "cpu") -> ModelBundle:
    """Read a bundle written by `save_bundle`; raises FileNotFoundError naming a missing part."""
    path = Path(path)
    for part in (WEIGHTS, SCHEMA, META):
        if not (path / part).is_file():
            raise FileNotFoundError(f"model bundle {path} lacks {part}; re-train or re-download it")
    meta = json.loads((path / META).read_text())
    schema = TableSchema.from_dict(json.loads((path / SCHEMA).read_text()))
    vae = TabularVAE(meta["n_num"], meta["cat_sizes"], VAEConfig(**legacy_config(meta["config"])))
    vae.load_state_dict(torch.load(path / WEIGHTS, map_location=map_location, weights_only=True))
    vae.eval()
    return ModelBundle(vae=vae, schema=schema, extra=meta.get("extra", {}))
