"""Errors that the CLI reports as one line and a non-zero exit.

`VaeflowError` is an expected failure: bad input, a missing table, a refused name. Its message
names the file, table, column or value at fault and says what to do; the CLI prints it as one
`error:` line and exits 2. `TransientError` is the subset that may pass on a second try (an
unreachable server, a busy lock): the only errors that tasks retry.
"""

from __future__ import annotations

import errno


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
    """An unknown model name or alias, or a version whose artifacts are missing or altered."""


class TransientError(VaeflowError):
    """What may pass on a retry: an unreachable server, a lock held by another job."""


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps) is a full disk or an exhausted quota."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def is_transient(exc: BaseException) -> bool:
    """The retry rule of every task: `TransientError`s and the OS's own network errors
    (`ConnectionError`, `TimeoutError`) are retried; clear input or configuration errors (they
    would fail again) and unexpected ones (bugs) are not."""
    return isinstance(exc, TransientError | ConnectionError | TimeoutError)
