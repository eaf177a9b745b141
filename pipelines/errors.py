"""Errors that the CLI reports as one line and a non-zero exit."""

from __future__ import annotations


class VaeflowError(Exception):
    """A user-facing failure: the message names the file, table, column or value at fault."""


class ConfigError(VaeflowError):
    """params.yaml or a --set override is invalid."""


class SourceError(VaeflowError):
    """A source or destination cannot be read or written (missing file, unknown table, bad name)."""


class DataError(VaeflowError):
    """The data itself is unusable (no rows, wrong types, infinities)."""


class DataValidationError(VaeflowError):
    """The Great Expectations suite failed; the message is the readable report."""


class RegistryError(VaeflowError):
    """An unknown model name or alias, or a version whose artifacts are missing."""
