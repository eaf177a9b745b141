"""vaeflow's ML core: a mixed-type tabular VAE in torch and Lightning, with no orchestration,
tracking, validation or storage imports."""

from vae_models.config import VAEConfig
from vae_models.schema import ColumnSpec, EncodedTable, SchemaError, TableSchema, infer_schema
from vae_models.vae import TabularVAE, VAEModule

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
