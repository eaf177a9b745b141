"""Names that become paths: registered model names and snapshot names.

A name from the user is validated as one safe path component before any filesystem call
(`../../victim` is refused, not resolved); a name derived from a source (a file's stem, a
table's name) is made safe and keyed by the source's identity, so two sources that share a
short name never share a snapshot folder or a suite.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pipelines.errors import ConfigError

if TYPE_CHECKING:
    from pipelines.warehouse import TableRef

# MLflow allows more in a registered model name; these also make a safe folder name and a
# registry filter that needs no quoting
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
MODEL_NAME_RULE = "letters, digits, '_', '-' and '.', starting with a letter or digit, at most 100 characters"


def model_name(name: str) -> str:
    """`name` when it is a valid registered model name; a `ConfigError` saying why otherwise."""
    if not isinstance(name, str) or not MODEL_NAME.match(name):
        raise ConfigError(f"invalid model name {name!r}: use {MODEL_NAME_RULE}")
    return name


def slug(text: str, fallback: str = "table") -> str:
    """`text` as one safe path component: other characters become '_', no leading dots."""
    cleaned = re.sub(r"[^A-Za-z0-9_.\-]", "_", text).lstrip(".-")
    return cleaned[:80] or fallback


def snapshot_name(ref: TableRef, default_source: str, warehouse_url: str) -> str:
    """The folder (and suite) name for a source's snapshot: the configured default source
    keeps its plain name (dvc.yaml tracks `data/snapshots/<name>`); any other source gets its
    identity's hash too (`diamonds-3fa2c1d0`), so a CSV and a table both called `diamonds`
    do not overwrite each other's snapshot."""
    from pipelines.warehouse import parse_ref

    base = slug(ref.name)
    try:
        default = parse_ref(default_source, warehouse_url)
    except Exception:  # the configured default is not a valid reference: no plain name for anyone
        default = None
    if default is not None and default.identity == ref.identity:
        return base
    return f"{base}-{ref.digest[:8]}"


def default_model_name(ref: TableRef) -> str:
    """`<source>_vae` for a source without `--name`, made valid."""
    return model_name(f"{slug(ref.name, 'model').lstrip('_')[:90] or 'model'}_vae")
