"""Data lineage in DVC: every trained snapshot is committed to the project's DVC cache (and
pushed to its default remote), and any version's snapshot can be checked out again by hash.

`commit_snapshot` does what `dvc commit` does for a directory output, with DVC's own
machinery (dvc-data): `build` hashes the folder into a tree object, whose id is DVC's
`<md5>.dir` (the same value `dvc.lock` records for it), and `transfer` copies the files and the
tree into the repository's cache (`.dvc/cache`). `push_snapshot` is `dvc push` of that
snapshot (`Repo.cloud.push`). `restore_snapshot` loads the tree from the cache (pulling it and
its files from the default remote when missing: `Repo.cloud.pull`), checks it out with
dvc-data's `checkout` into a temp folder, re-hashes what was written and only publishes it when
the hash is the one asked for.

The DVC repository is the one at or above the project root (the folder of params.yaml). A
project without one gets one at its root on the first training (`dvc init --no-scm`: a
`.dvc/` folder with the cache, no git needed). `snapshot.dvc` chooses: `auto` (default: a
failure is logged and tagged `vaeflow.dvc_skipped`, training goes on), `required` (a failure
to commit or push fails the training) or `off` (nothing is committed; tagged as such).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines import atomic
from pipelines.config import Settings
from pipelines.credentials import redact
from pipelines.errors import (
    DataError,
    RegistryError,
    SourceError,
    TransientError,
    VaeflowError,
)

if TYPE_CHECKING:
    from dvc.repo import Repo
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

log = logging.getLogger(__name__)

DVC_TAG = "vaeflow.dvc_md5"  # DVC's hash of the snapshot the version trained on
REMOTE_TAG = "vaeflow.dvc_remote"  # whether it reached the default remote
SKIPPED_TAG = "vaeflow.dvc_skipped"  # why there is no DVC_TAG
_DIR_HASH = re.compile(r"^[0-9a-f]{32}\.dir$")


def _why(exc: BaseException) -> str:
    """An exception as one short, redacted line."""
    lines = redact(str(exc)).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


@contextlib.contextmanager
def _quiet_dvc() -> Iterator[None]:
    """DVC's own log lines ("Initialized DVC repository.", missing cache files) stay out of
    vaeflow's output: what matters comes back as vaeflow's warnings and errors."""
    logger = logging.getLogger("dvc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def open_repo(settings: Settings, create: bool = False) -> Iterator[Repo]:
    """The DVC repository at or above the project root; with `create`, one is initialised at
    the root when there is none (`dvc init --no-scm`, analytics off)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    root = settings.root.resolve()
    with _quiet_dvc():
        try:
            repo = Repo(str(root))
        except NotDvcRepoError:
            if not create:
                raise SourceError(
                    f"no DVC repository at or above {root} (no .dvc folder): snapshots are "
                    f"committed to one by `vaeflow train`; run from the project that trained it"
                ) from None
            with atomic.named_lock(f"dvc-init:{root}", f"the DVC repository at {root}"):
                try:
                    repo = Repo(str(root))
                except NotDvcRepoError:
                    repo = Repo.init(str(root), no_scm=True)
                    with repo.config.edit() as conf:
                        conf["core"]["analytics"] = False
                    log.info("initialised a DVC repository (no git) at %s for snapshot lineage", root)
        try:
            yield repo
        finally:
            repo.close()


def _ignore(repo: Repo, folder: Path):
    """The repository's .dvcignore for a folder inside it (what `dvc add` would hash)."""
    return repo.dvcignore if folder.is_relative_to(Path(repo.root_dir).resolve()) else None


def commit_snapshot(folder: Path, settings: Settings) -> str:
    """Commit the snapshot folder to the project's DVC cache (as `dvc commit` does for a
    directory output) and return DVC's hash of it (`<md5>.dir`)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.transfer import transfer

    folder = folder.resolve()
    if not folder.is_dir():
        raise SourceError(f"snapshot folder {folder} does not exist")
    with open_repo(settings, create=True) as repo, atomic.target_lock(folder):
        cache = repo.cache.local
        staging, _, obj = build(cache, str(folder), cache.fs, "md5", ignore=_ignore(repo, folder))
        # copies (or reflinks), never hardlinks: the snapshot folder stays writable by ingest
        transfer(staging, cache, {obj.hash_info}, shallow=False, hardlink=False)
    value = str(obj.hash_info.value)
    log.info("snapshot %s committed to the DVC cache as %s", folder, value)
    return value


def push_snapshot(dvc_hash: str, settings: Settings) -> str:
    """`dvc push` of one committed snapshot to the default remote; returns what happened
    (`pushed to NAME`, or `not pushed: why`). A failure is a warning, not an error."""
    from dvc_data.hashfile import load
    from dvc_data.hashfile.hash_info import HashInfo

    with open_repo(settings) as repo:
        remote = repo.config["core"].get("remote")
        if not remote:
            return "not pushed: no default DVC remote"
        try:
            tree = load(repo.cache.local, HashInfo("md5", dvc_hash))
            result = repo.cloud.push(_object_ids(tree), remote=remote)
            if result.failed:
                raise OSError(f"{len(result.failed)} object(s) failed to upload")
        except Exception as exc:  # noqa: BLE001 - any remote failure: the training goes on
            why = _why(exc)
            log.warning("could not push snapshot %s to DVC remote %r: %s", dvc_hash, remote, why)
            return f"not pushed: push to {remote} failed: {why}"
    return f"pushed to {remote}"


def snapshot_tags(folder: Path, settings: Settings) -> dict[str, str]:
    """The DVC lineage tags of a snapshot: `vaeflow.dvc_md5` (its hash, committed to the cache)
    and `vaeflow.dvc_remote`; or `vaeflow.dvc_skipped` when DVC is off or failed (auto mode)."""
    how = settings.snapshot.dvc
    if how == "off":
        return {SKIPPED_TAG: "snapshot.dvc=off"}
    try:
        dvc_hash = commit_snapshot(folder, settings)
    except Exception as exc:
        why = _why(exc)
        if how == "required":
            if isinstance(exc, VaeflowError):
                raise
            raise SourceError(
                f"snapshot {folder} could not be committed to DVC (snapshot.dvc=required): {why}"
            ) from exc
        log.warning("snapshot %s not committed to DVC (%s); its data cannot be restored by hash", folder, why)
        return {SKIPPED_TAG: f"commit failed: {why}"}
    pushed = push_snapshot(dvc_hash, settings)
    if how == "required" and pushed.startswith("not pushed: push"):
        raise TransientError(f"snapshot {folder} (DVC {dvc_hash}) {pushed.removeprefix('not pushed: ')}")
    return {DVC_TAG: dvc_hash, REMOTE_TAG: pushed}


def _object_ids(tree: Tree) -> list[HashInfo]:
    """What `dvc push`/`dvc fetch` move for a directory: its tree object and every file in it."""
    return [tree.hash_info, *(oid for _, _, oid in tree)]


def _load_tree(repo: Repo, dvc_hash: str) -> Tree:
    """The snapshot's tree, with every file it lists in the local cache: what is missing is
    pulled from the default remote (`dvc fetch` of those objects: the tree, then its files)."""
    from dvc_data.hashfile import load
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_objects.errors import ObjectFormatError

    cache = repo.cache.local
    tree_id = HashInfo("md5", dvc_hash)
    remote = repo.config["core"].get("remote")
    where = f"snapshot {dvc_hash} is not (wholly) in the DVC cache {cache.path}"

    def lacking() -> tuple[Tree | None, list[HashInfo]]:
        try:
            tree = load(cache, tree_id)
        except (FileNotFoundError, ObjectFormatError):
            return None, [tree_id]
        return tree, [oid for oid in _object_ids(tree) if not cache.exists(oid.value)]

    def pull(wanted: list[HashInfo]) -> None:
        if not remote:
            raise SourceError(f"{where} and no default DVC remote is configured to pull it from")
        try:
            repo.cloud.pull(wanted, remote=remote)
        except Exception as exc:  # noqa: BLE001 - any remote failure, reported with its name
            raise SourceError(
                f"{where} and pulling it from DVC remote {remote!r} failed: {_why(exc)}"
            ) from exc

    tree, wanted = lacking()
    if tree is None:  # the tree object first: it lists the files
        pull(wanted)
        tree, wanted = lacking()
    if tree is not None and wanted:
        pull(wanted)
        tree, wanted = lacking()
    if tree is None or wanted:
        raise SourceError(f"{where} nor on DVC remote {remote!r}")
    return tree


def _empty_or_absent(dest: Path) -> None:
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise SourceError(f"{dest} already exists and is not an empty folder; restore into another --to")


def restore_snapshot(dvc_hash: str, dest: Path, settings: Settings) -> Path:
    """Check the snapshot with DVC hash `dvc_hash` out into `dest` (absent or an empty
    folder), pulling it from the default remote when the cache lacks it; the files written are
    hashed again and `dest` only appears when they match."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.checkout import checkout

    if not _DIR_HASH.match(dvc_hash or ""):
        raise DataError(f"{dvc_hash!r} is not a DVC directory hash (<32 hex digits>.dir)")
    dest = Path(dest).absolute()
    _empty_or_absent(dest)
    with open_repo(settings) as repo:
        cache = repo.cache.local
        tree = _load_tree(repo, dvc_hash)
        with atomic.atomic_dir(dest) as tmp:
            _empty_or_absent(dest)  # again, under the folder's lock
            out = tmp / "snapshot"
            checkout(str(out), cache.fs, tree, cache)
            _, _, written = build(cache, str(out), cache.fs, "md5", dry_run=True)
            if written.hash_info.value != dvc_hash:
                raise DataError(
                    f"the files checked out for snapshot {dvc_hash} hash to {written.hash_info.value}: "
                    f"the DVC cache {cache.path} holds a corrupt copy; {dest} was not written"
                )
            for item in out.iterdir():
                shutil.move(str(item), tmp / item.name)
            out.rmdir()
    log.info("snapshot %s restored into %s", dvc_hash, dest)
    return dest


@dataclass
class Restored:
    name: str
    version: str
    dvc_hash: str
    path: Path


def restore_version(settings: Settings, model_uri: str, dest: Path | None = None) -> Restored:
    """Restore the snapshot a registered version trained on (its `vaeflow.dvc_md5` tag) into
    `dest` (default: restored/NAME/vVERSION/SNAPSHOT under the project root)."""
    from pipelines import registry
    from pipelines.names import slug

    client = registry.get_client(settings)
    model = registry.resolve(client, model_uri)
    tags = client.get_model_version(model.name, model.version).tags
    dvc_hash = tags.get(DVC_TAG)
    if not dvc_hash:
        why = tags.get(SKIPPED_TAG)
        raise RegistryError(
            f"{model.name} version {model.version} has no {DVC_TAG} tag "
            f"({'DVC was skipped: ' + why if why else 'trained before its snapshot was committed to DVC'}); "
            f"its data cannot be restored by hash"
        )
    snapshot = slug(tags.get("vaeflow.snapshot") or "snapshot", "snapshot")
    dest = dest or settings.path("restored") / model.name / f"v{model.version}" / snapshot
    return Restored(model.name, model.version, dvc_hash, restore_snapshot(dvc_hash, dest, settings))
