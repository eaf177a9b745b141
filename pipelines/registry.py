"""The MLflow model registry: aliases and tags (no stages).

`champion` is the version batch jobs score with; a new version gets `challenger` and takes
`champion` only through the promotion gate. Every decision is recorded as tags on the version,
and the champion history (a registered-model tag) makes `rollback` possible.
"""

from __future__ import annotations

import fcntl
import json
import logging
import re
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines.config import Settings
from pipelines.errors import RegistryError

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "vaeflow.champion_history"
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


def _hide_credentials(url: str) -> str:
    """A server URL with any user:password@ or token@ part replaced by ***@."""
    return re.sub(r"//[^@/]*@", "//***@", url)


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, with the address, when an MLflow tracking server does not answer (instead of
    MLflow's minutes of silent HTTP retries)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    shown = _hide_credentials(uri)
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status != 200:
                raise RegistryError(
                    f"MLflow tracking server {shown} answered /health with HTTP {resp.status}"
                )
    except (urllib.error.URLError, OSError) as exc:
        raise RegistryError(
            f"MLflow tracking server {shown} is unreachable ({getattr(exc, 'reason', exc)}); start it, or "
            f"point MLFLOW_TRACKING_URI at a running server"
        ) from exc


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
    name = m["name"]
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
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
        raise RegistryError(f"model {name!r} has no {what}") from exc
    return ResolvedModel(name, str(mv.version), mv.run_id, f"models:/{name}/{mv.version}")


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
    session advisory lock; a local SQLite / file store: an exclusive file lock beside it.
    """
    url = settings.promotion.lock_url or settings.tracking_uri
    if url.startswith(("postgresql", "postgres://")):
        import psycopg

        dsn = re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", url)
        with psycopg.connect(dsn, autocommit=True) as conn:
            key = zlib.crc32(f"vaeflow.promote.{name}".encode())
            conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            try:
                yield
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        return
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///")).with_suffix(".promote.lock")
    elif url.startswith(("http://", "https://", "databricks")):
        log.warning(
            "no promotion lock for tracking server %s: set promotion.lock_url to its PostgreSQL "
            "store, or run one retrain at a time",
            _hide_credentials(url),
        )
        yield
        return
    else:
        path = Path(url.removeprefix("file://")) / ".promote.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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
        except MlflowException:
            current = None
        validation = client.get_model_version(name, version).tags.get("validation", "passed")
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
