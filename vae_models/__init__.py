"""vaeflow's ML core: a mixed-type tabular VAE in torch and Lightning, with no orchestration,
tracking, validation or storage imports."""

from vae_models.config import VAEConfig
from vae_models.schema import ColumnSpec, EncodedTable, SchemaError, TableSchema, infer_schema
from vae_models.vae import TabularVAE


def __getattr__(name: str):
    """`VAEModule` (Lightning) is imported on first use: scoring needs only the network."""
    if name == "VAEModule":
        from vae_models.module import VAEModule

        return VAEModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ColumnSpec",
    "EncodedTable",
    "SchemaError",
    "TableSchema",
    "TabularVAE",
    "VAEConfig",
    "VAEModule",
    "infer_schema",
]
