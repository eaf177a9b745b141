"""Atomic file and folder outputs: written beside the target, then renamed over it.

Temp files and folders get the permissions a plain `open()` or `mkdir` would give under the
process's umask (or the replaced target's own mode), not `tempfile`'s private 0600/0700. A
per-target lock (a file in a per-user lock folder, not beside the output) serialises writers
of one target, and under it the next writer removes what a killed writer left behind.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipelines.errors import SourceError, TransientError, disk_full

LOCK_TIMEOUT_S = float(os.environ.get("VAEFLOW_LOCK_TIMEOUT", "600"))


def umask() -> int:
    """The process's umask (read from /proc on Linux, which does not change it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    current = os.umask(0o022)
    os.umask(current)
    return current


def publish_mode(tmp: Path, target: Path, directory: bool = False) -> None:
    """Give `tmp` the mode `target` has (when it exists) or the umask's default for a new one."""
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = (0o777 if directory else 0o666) & ~umask()
    os.chmod(tmp, mode)


def lock_dir() -> Path:
    """Where lock files live: one folder per user under the temp dir (`VAEFLOW_LOCK_DIR`), so
    no lock file is left beside a user's outputs."""
    folder = Path(
        os.environ.get("VAEFLOW_LOCK_DIR")
        or Path(tempfile.gettempdir()) / f"vaeflow-locks-{getattr(os, 'getuid', lambda: 'user')()}"
    )
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def named_lock(key: str, what: str, timeout: float | None = None) -> Iterator[None]:
    """An exclusive lock across processes of this machine, named by `key` (e.g. a table's
    identity); a writer that waits longer than `timeout` seconds gets a `TransientError`."""
    from filelock import FileLock, Timeout

    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    lock = FileLock(str(lock_dir() / f"{digest}.lock"))
    wait = LOCK_TIMEOUT_S if timeout is None else timeout
    try:
        lock.acquire(timeout=wait)
    except Timeout as exc:
        raise TransientError(
            f"another job has been writing {what} for over {wait:.0f}s; wait for it to finish, "
            f"or raise VAEFLOW_LOCK_TIMEOUT"
        ) from exc
    try:
        yield
    finally:
        lock.release()


def target_lock(target: Path, timeout: float | None = None):
    """`named_lock` for writing a file or folder, keyed by its resolved real path."""
    return named_lock(f"path:{os.path.realpath(target)}", str(target), timeout)


def temp_prefix(target: Path) -> str:
    """Temp files and folders of `target`: `.NAME.vaeflow-*`, which no other target's share."""
    return f".{target.name}.vaeflow-"


def remove_stale(target: Path) -> None:
    """Remove temp files and folders a killed writer of `target` left (call under its lock)."""
    for path in target.parent.glob(f"{glob.escape(temp_prefix(target))}*"):
        if path.name.endswith((".tmp", ".old")):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def no_space(what: object) -> SourceError:
    """The error for a full disk (or an exhausted quota) while writing `what`."""
    return SourceError(f"no space left on the device writing {what}; it is unchanged")


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `target`; when the block succeeds it replaces `target`
    (the old folder is renamed aside, then removed). On any error `target` is untouched."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with target_lock(target):
        old = target.with_name(f"{temp_prefix(target)}old")
        if old.is_dir() and not target.exists():  # a swap was killed between its two renames
            os.replace(old, target)
        remove_stale(target)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent))
        try:
            yield tmp
            publish_mode(tmp, target, directory=True)
            if target.exists():
                os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            if disk_full(exc):
                raise no_space(target) from exc
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(target: Path, text: str) -> Path:
    """Write a small text file atomically, with the umask's (or the old file's) permissions."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        publish_mode(tmp, target)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if disk_full(exc):
            raise no_space(target) from exc
        raise
    return target
