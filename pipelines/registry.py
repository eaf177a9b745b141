"""The MLflow model registry: aliases and tags (no stages), and the one place that loads a
registered model.

`champion` is the version batch jobs score with; a new version gets `challenger` and takes
`champion` only through the promotion gate. Every decision is recorded as tags on the version,
and the champion history (a registered-model tag) makes `rollback` possible.

Every version records the sha256 of each of its artifact files (`vaeflow.artifact_sha256`, a
registry tag, not a file in the artifact store). `load_bundle` downloads the version, checks
every file against that record and that no path leaves the model folder, and only then reads
the weights (`torch.load(weights_only=True)`); no code from the artifact store is run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines import atomic
from pipelines.config import Settings
from pipelines.credentials import redact
from pipelines.errors import RegistryError, TransientError
from pipelines.names import model_name
from vae_models.bundle import ModelBundle

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "vaeflow.champion_history"
ARTIFACTS_TAG = "vaeflow.artifact_sha256"
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, with the address, when an MLflow tracking server does not answer (instead of
    MLflow's minutes of silent HTTP retries): a `TransientError`, which tasks retry."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit, urlunsplit

    shown = redact(uri)
    parts = urlsplit(uri)
    health = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1])).rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout) as resp:
            if resp.status != 200:
                raise TransientError(
                    f"MLflow tracking server {shown} answered /health with HTTP {resp.status}"
                )
    except urllib.error.HTTPError as exc:
        kind = TransientError if exc.code >= 500 else RegistryError  # a 401/404 will not pass on retry
        raise kind(
            f"MLflow tracking server {shown} answered /health with HTTP {exc.code} ({exc.reason})"
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise TransientError(
            f"MLflow tracking server {shown} is unreachable ({redact(getattr(exc, 'reason', exc))}); "
            f"start it, or point MLFLOW_TRACKING_URI at a running server"
        ) from exc


def missing(exc: MlflowException) -> bool:
    """Whether MLflow says the thing does not exist (rather than that it could not answer)."""
    return getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _unanswered(what: str, exc: MlflowException) -> TransientError:
    return TransientError(f"the MLflow registry did not answer while {what}: {redact(exc.message)[:300]}")


def get_client(settings: Settings) -> MlflowClient:
    """A client for the configured tracking store and registry (checked to be reachable)."""
    check_reachable(settings.tracking_uri)
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


@dataclass
class ResolvedModel:
    name: str
    version: str
    run_id: str
    uri: str


def resolve(client: MlflowClient, uri: str) -> ResolvedModel:
    """`models:/NAME@alias` or `models:/NAME/VERSION` -> the concrete version and its run."""
    m = _URI.match(uri.strip())
    if not m:
        raise RegistryError(f"model URI {uri!r} is malformed: use models:/NAME@champion or models:/NAME/3")
    name = model_name(m["name"])
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if not missing(exc):
            raise _unanswered(f"looking up model {name!r}", exc) from exc
        raise RegistryError(
            f"registered model {name!r} does not exist; train it first with `vaeflow train`"
        ) from exc
    try:
        mv = (
            client.get_model_version_by_alias(name, m["alias"])
            if m["alias"]
            else client.get_model_version(name, m["version"])
        )
    except MlflowException as exc:
        what = f"alias @{m['alias']}" if m["alias"] else f"version {m['version']}"
        if not missing(exc):
            raise _unanswered(f"looking up {what} of {name!r}", exc) from exc
        raise RegistryError(f"model {name!r} has no {what}") from exc
    return ResolvedModel(name, str(mv.version), mv.run_id, f"models:/{name}/{mv.version}")


def latest_version(client: MlflowClient, name: str) -> str:
    """The highest version number of a registered model (a clear error when there is none)."""
    versions = client.search_model_versions(f"name='{model_name(name)}'")
    if not versions:
        resolve(client, f"models:/{name}@{CHAMPION}")  # names an unknown model as such
        raise RegistryError(f"model {name!r} has no versions")
    return str(max(int(v.version) for v in versions))


# ---------------------------------------------------------------- artifact integrity


def artifact_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, keyed by its relative POSIX path. A symbolic link
    is refused: a model folder holds plain files only."""
    digests: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise RegistryError(f"model artifact {rel} is a symbolic link; a model holds plain files only")
        if path.is_file():
            h = hashlib.sha256()
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            digests[rel] = h.hexdigest()
    return digests


def _download(settings: Settings, uri: str, dst: Path) -> Path:
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per file otherwise

    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except MlflowException as exc:
        raise RegistryError(f"cannot download {uri}: {redact(exc.message)}") from exc
    except OSError as exc:  # requests' connection errors are OSErrors
        raise TransientError(f"cannot download {uri}: {redact(exc)}") from exc


def record_artifacts(client: MlflowClient, settings: Settings, name: str, version: str) -> dict[str, str]:
    """Hash every artifact file of a registered version (as a loader downloads it) and keep the
    digests as the version's `vaeflow.artifact_sha256` tag."""
    with tempfile.TemporaryDirectory(prefix="vaeflow-record-") as tmp:
        digests = artifact_digests(_download(settings, f"models:/{name}/{version}", Path(tmp)))
    client.set_model_version_tag(name, version, ARTIFACTS_TAG, json.dumps(digests, sort_keys=True))
    return digests


def verify_artifacts(folder: Path, expected: dict[str, str], what: str) -> None:
    """Every file as recorded, none missing, none added; raises `RegistryError` naming the first
    that differs."""
    found = artifact_digests(folder)
    for rel in sorted(set(expected) | set(found)):
        if rel not in found:
            problem = "is missing"
        elif rel not in expected:
            problem = "was added after registration"
        elif found[rel] != expected[rel]:
            problem = "was altered after registration (its sha256 differs from the one recorded)"
        else:
            continue
        raise RegistryError(
            f"{what}: artifact {rel} {problem}; refusing to load it. Re-register the model from a "
            f"trusted training run, or restore the artifact store"
        )


def _inside(folder: Path, relative: str, what: str) -> Path:
    """`folder / relative`, refused when it resolves outside `folder`."""
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise RegistryError(
            f"{what}: MLmodel names {relative!r}, outside the model folder; refusing to load it"
        )
    return path


def bundle_folder(model_dir: Path, what: str) -> Path:
    """The weights/schema folder of a downloaded model, from its MLmodel (checked to stay inside)."""
    import yaml

    try:
        meta = yaml.safe_load((model_dir / "MLmodel").read_text()) or {}
        pyfunc = meta["flavors"]["python_function"]
        bundle = pyfunc["artifacts"]["bundle"]["path"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise RegistryError(f"{what} is not a vaeflow model (its MLmodel has no bundle artifact)") from exc
    for key in ("python_model", "code"):
        if isinstance(pyfunc.get(key), str):
            _inside(model_dir, pyfunc[key], what)
    for artifact in pyfunc.get("artifacts", {}).values():
        _inside(model_dir, str(artifact.get("path", "")), what)
    return _inside(model_dir, bundle, what)


def load_bundle(settings: Settings, uri: str) -> tuple[ModelBundle, ResolvedModel]:
    """The one way vaeflow loads a registered model: resolve the alias or version, download its
    artifacts, verify each file's sha256 against the version's record and every path in its
    MLmodel, then read the weights. Nothing from the artifact store is executed."""
    from vae_models.bundle import load_bundle as read_bundle

    client = get_client(settings)
    resolved = resolve(client, uri)
    what = f"model {resolved.name} version {resolved.version}"
    record = client.get_model_version(resolved.name, resolved.version).tags.get(ARTIFACTS_TAG)
    if not record:
        raise RegistryError(
            f"{what} has no recorded artifact checksums ({ARTIFACTS_TAG}): it was not registered by this "
            f"version of vaeflow. Retrain it (vaeflow train) to register a verifiable version"
        )
    with tempfile.TemporaryDirectory(prefix="vaeflow-model-") as tmp:
        local = _download(settings, resolved.uri, Path(tmp))
        verify_artifacts(local, json.loads(record), what)
        folder = bundle_folder(local, what)
        try:
            bundle = read_bundle(folder)
        except (FileNotFoundError, KeyError, ValueError, RuntimeError) as exc:
            raise RegistryError(f"{what}: cannot read its weights: {exc}") from exc
    return bundle, resolved


def _history(client: MlflowClient, name: str) -> list[str]:
    tags = client.get_registered_model(name).tags
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def _set_champion(client: MlflowClient, name: str, version: str) -> None:
    history = _history(client, name)
    history.append(str(version))
    client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


@dataclass
class PromotionDecision:
    name: str
    version: str
    promoted: bool
    reason: str
    metric: str
    challenger_value: float | None = None
    champion_value: float | None = None
    champion_version: str | None = None


def _metric(client: MlflowClient, name: str, version: str, metric: str) -> float:
    mv = client.get_model_version(name, version)
    value = client.get_run(mv.run_id).data.metrics.get(metric)
    if value is None:
        raise RegistryError(f"model {name!r} version {version} has no metric {metric!r} in run {mv.run_id}")
    return float(value)


@contextmanager
def promotion_lock(settings: Settings, name: str) -> Iterator[None]:
    """Serialise promotions of one model across processes, so two trainings finishing at once
    cannot interleave their read-compare-move of the aliases and the champion history.

    PostgreSQL (the backend store, or `promotion.lock_url` in front of a tracking server): a
    session advisory lock; a local SQLite / file store: a lock file of this machine. Connecting
    takes at most 10 s and waiting for the lock `promotion.lock_timeout_s`; either failure is a
    `TransientError`.
    """
    url = settings.lock_url or settings.tracking_uri
    timeout = settings.promotion.lock_timeout_s
    if url.startswith(("postgresql", "postgres://")):
        import psycopg

        from pipelines.warehouse import advisory_lock

        dsn = re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", url)
        try:
            conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise TransientError(
                f"cannot connect to the promotion lock at {redact(dsn)}: {redact(exc)}"
            ) from exc
        with conn:
            key = zlib.crc32(f"vaeflow.promote.{name}".encode())
            with advisory_lock(conn, key, f"promotions of {name}", timeout):
                yield
        return
    if url.startswith(("http://", "https://", "databricks")):
        log.warning(
            "no promotion lock for tracking server %s: set promotion.lock_url to its PostgreSQL "
            "store, or run one retrain at a time",
            redact(url),
        )
        yield
        return
    store = url.removeprefix("sqlite:///").removeprefix("file://")
    with atomic.named_lock(f"promote:{os.path.realpath(store)}:{name}", f"promotions of {name}", timeout):
        yield


def promote(
    client: MlflowClient,
    name: str,
    version: str,
    settings: Settings,
    score: Callable[[str], float] | None = None,
) -> PromotionDecision:
    """Apply the promotion rule to `version`: first version -> champion; later versions become
    `challenger` and take `champion` only when they passed validation and beat the champion
    by `promotion.min_improvement` on `promotion.metric` (lower is better).

    `score(version)` re-scores a version on the challenger's frozen evaluation snapshot, so the
    champion is measured on the same data, not trusted from its old run; without it, the
    metric logged by each version's run is compared. Decisions are tags on the version.
    """
    metric, margin = settings.promotion.metric, settings.promotion.min_improvement
    version = str(version)
    measure = score or (lambda v: _metric(client, name, v, metric))
    with promotion_lock(settings, name):
        try:
            current = client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException as exc:
            if not missing(exc):  # a registry that did not answer is not "no champion yet"
                raise _unanswered(f"reading the champion of {name!r}", exc) from exc
            current = None
        # a version without a recorded validation result has not passed it
        validation = client.get_model_version(name, version).tags.get("validation", "not recorded")
        if current is not None and str(current.version) == version:
            decision = PromotionDecision(name, version, True, "already champion", metric, None, None, version)
        elif validation != "passed":
            if current is not None:
                client.set_registered_model_alias(name, CHALLENGER, version)
            decision = PromotionDecision(
                name,
                version,
                False,
                f"validation {validation}: a version that failed validation is never promoted",
                metric,
            )
        elif current is None:
            value = measure(version)
            _set_champion(client, name, version)
            decision = PromotionDecision(name, version, True, "first version of the model", metric, value)
        else:
            client.set_registered_model_alias(name, CHALLENGER, version)
            value, champ = measure(version), measure(str(current.version))
            better = value < champ - margin
            if better:
                _set_champion(client, name, version)
            how = "re-scored on the same evaluation snapshot" if score else "from each run"
            reason = (
                f"{metric} {value:.5f} vs champion v{current.version} {champ:.5f} ({how}; "
                f"{'improves' if better else 'does not improve'} by more than {margin})"
            )
            decision = PromotionDecision(
                name, version, better, reason, metric, value, champ, str(current.version)
            )
        for k, v in asdict(decision).items():
            if k not in ("name", "version") and v is not None:
                client.set_model_version_tag(name, version, f"promotion.{k}", str(v))
    log.info(
        "promotion of %s v%s: %s (%s)",
        name,
        version,
        "promoted" if decision.promoted else "refused",
        decision.reason,
    )
    return decision


def rollback(client: MlflowClient, name: str, settings: Settings | None = None) -> tuple[str, str]:
    """Move `champion` back to the previous champion; returns (from_version, to_version)."""
    model_name(name)
    if settings is not None:
        with promotion_lock(settings, name):
            return rollback(client, name)
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        raise RegistryError(f"model {name!r} does not exist or has no champion to roll back") from exc
    history = _history(client, name)
    while history and history[-1] == str(current.version):
        history.pop()
    if not history:
        raise RegistryError(f"model {name!r} has no earlier champion than v{current.version} to roll back to")
    target = history[-1]
    client.set_registered_model_alias(name, CHAMPION, target)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    client.set_model_version_tag(name, str(current.version), "promotion.rolled_back_to", target)
    return str(current.version), target
