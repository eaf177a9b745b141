"""The MLflow model registry: aliases and tags (no stages), and the one place that loads a
registered model.

`champion` is the version batch jobs score with; `challenger` the newest version the gate
refused (a version that becomes champion, or is rolled back, loses it). A new version takes
`champion` only through the promotion gate (`gate`: an improvement beyond the noise of the
evaluation split). Every decision is recorded as `promotion.*` tags on the version (with
`promotion.status`: champion, refused, superseded or rolled_back), and every change of champion
as an event of the champion history (`history`, one registered-model tag), which `rollback`
steps back through. A rolled-back version stays out of promotion until a forced one.

Every version records the sha256 of each of its artifact files (`vaeflow.artifact_sha256`, a
registry tag, not a file in the artifact store). `load_bundle` downloads the version, checks
every file against that record and that no path leaves the model folder, and only then reads
the weights (`torch.load(weights_only=True)`); no code from the artifact store is run.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
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
PREFIX = "promotion."  # the decision tags on a version
# what makes a retrain a rerun: data, params, code
LINEAGE = ("vaeflow.snapshot_md5", "vaeflow.params_hash", "vaeflow.git_commit", "vaeflow.code_version")
_HISTORY_CHARS = 5000  # MLflow's SQL stores keep a registered-model tag in VARCHAR(5000)
_EVENT_REASON_CHARS = 300
_TAG_CHARS = 5000
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
    if settings.registry_uri != settings.tracking_uri:
        check_reachable(settings.registry_uri)
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)


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
    mlflow.set_registry_uri(settings.registry_uri)
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


# ---------------------------------------------------------------- promotion records


def current_user() -> str:
    """Who runs this process (recorded with every manual promotion and rollback)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def history(client: MlflowClient, name: str) -> list[dict]:
    """The champion history: the registered-model tag `vaeflow.champion_history`, a JSON list
    of events `{version, action, reason, by, time}` (action `promote`, `force` or `rollback`;
    a rollback also names the champion it restored as `to`), oldest first. The earlier format,
    a list of version strings, is read as promotions."""
    raw = json.loads(client.get_registered_model(name).tags.get(HISTORY_TAG) or "[]")
    return [e if isinstance(e, dict) else {"version": str(e), "action": "promote"} for e in raw]


def champion_chain(events: list[dict]) -> list[str]:
    """The champions in order, each rollback cutting the chain back to the version it restored:
    what `rollback` steps back through."""
    chain: list[str] = []
    for event in events:
        if event.get("action") == "rollback":
            to = str(event.get("to"))
            chain = chain[: len(chain) - chain[::-1].index(to)] if to in chain else [to]
        else:
            chain.append(str(event["version"]))
    return chain


def _record(client: MlflowClient, name: str, event: dict) -> None:
    """Append an event to the champion history. MLflow's SQL stores keep a registered-model tag
    in 5000 characters: the oldest events lose their reason, user and time first, then go."""
    if event.get("reason"):
        event["reason"] = str(event["reason"])[:_EVENT_REASON_CHARS]
    events = [*history(client, name), event]
    text = json.dumps(events, separators=(",", ":"))
    oldest = 0
    while len(text) > _HISTORY_CHARS and events:
        if oldest < len(events) - 1:
            events[oldest] = {k: v for k, v in events[oldest].items() if k in ("version", "action", "to")}
            oldest += 1
        else:
            events.pop(0)
            oldest = 0
        text = json.dumps(events, separators=(",", ":"))
    client.set_registered_model_tag(name, HISTORY_TAG, text)


def is_rolled_back(tags: dict[str, str]) -> bool:
    """Whether a version's tags say it was rolled back (and not forced back since)."""
    flag = tags.get(f"{PREFIX}rolled_back")
    if flag is not None:
        return flag.lower() == "true"
    return f"{PREFIX}rolled_back_to" in tags  # registries from before the flag


def _rollback_note(version: str, tags: dict[str, str]) -> str:
    parts = [f"to v{tags[f'{PREFIX}rolled_back_to']}" if f"{PREFIX}rolled_back_to" in tags else ""]
    if tags.get(f"{PREFIX}rollback_at"):
        parts.append(f"on {tags[f'{PREFIX}rollback_at']} by {tags.get(f'{PREFIX}rollback_by', '?')}")
    if tags.get(f"{PREFIX}rollback_reason"):
        parts.append(f"reason: {tags[f'{PREFIX}rollback_reason']!r}")
    return f"version {version} was rolled back " + " ".join(p for p in parts if p)


def same_lineage(a: dict[str, str], b: dict[str, str]) -> bool:
    """Two versions trained on the same data and params (both recorded) with the same code."""
    return all(a.get(k) for k in LINEAGE[:2]) and all(a.get(k) == b.get(k) for k in LINEAGE)


def _rerun_of_rolled_back(client: MlflowClient, name: str, version: str, tags: dict[str, str]) -> str | None:
    """A rolled-back version trained on the same data, params and code as `version` (a rerun
    that would bring it back), if any."""
    for mv in client.search_model_versions(f"name='{name}'"):
        if same_lineage(tags, mv.tags) and str(mv.version) != version and is_rolled_back(mv.tags):
            return str(mv.version)
    return None


def _move_champion(
    client: MlflowClient, name: str, version: str, previous: str | None, event: dict[str, Any]
) -> None:
    """`champion` -> `version`, which stops being `challenger`; the previous champion is
    marked superseded; the event goes into the champion history."""
    client.set_registered_model_alias(name, CHAMPION, version)
    if str(client.get_registered_model(name).aliases.get(CHALLENGER)) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    if previous is not None and previous != version:
        client.set_model_version_tag(name, previous, f"{PREFIX}status", "superseded")
    _record(client, name, {"version": version, **event})


# ---------------------------------------------------------------- the gate


@dataclass
class Measurement:
    """A version's promotion metric; `rows`, when it was re-scored, are its per-eval-row values
    (scaled so their mean is `value`), and `se` the standard error of `value`."""

    value: float
    rows: np.ndarray | None = None
    se: float | None = None

    def __post_init__(self) -> None:
        if self.se is None and self.rows is not None and len(self.rows) > 1:
            self.se = float(np.std(self.rows, ddof=1) / math.sqrt(len(self.rows)))
        if self.se is not None and not math.isfinite(self.se):
            self.se = None


@dataclass(frozen=True)
class Gate:
    improvement: float  # champion - challenger (lower is better)
    se: float | None  # standard error of the improvement; None: none available
    margin: float  # the improvement required: se_multiplier x se + min_improvement
    method: str  # how the SE was obtained
    passed: bool


def gate(new: Measurement, old: Measurement, min_improvement: float, se_multiplier: float) -> Gate:
    """Whether `new` beats `old` by more than `se_multiplier` x SE + `min_improvement`.

    SE is the standard error of the paired per-row differences when both were scored on the
    same evaluation rows, else sqrt(se_new^2 + se_old^2) of their own SEs; with neither (runs
    logged before SEs were), the margin is `min_improvement` alone."""
    improvement = old.value - new.value
    se, method = None, "no standard error available"
    if math.isfinite(new.value) and math.isfinite(old.value):
        if new.rows is not None and old.rows is not None and len(new.rows) == len(old.rows) > 1:
            d = np.asarray(old.rows, dtype=np.float64) - np.asarray(new.rows, dtype=np.float64)
            se, method = float(np.std(d, ddof=1) / math.sqrt(len(d))), f"paired over {len(d)} eval rows"
        elif new.se is not None and old.se is not None:
            se, method = math.hypot(new.se, old.se), "sqrt(se_new^2 + se_champion^2) of the logged SEs"
    margin = se_multiplier * (se or 0.0) + min_improvement
    return Gate(improvement, se, margin, method, bool(improvement > margin))


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
    improvement: float | None = None
    se: float | None = None
    margin: float | None = None
    status: str | None = None  # champion | refused
    forced: bool = False
    requested_by: str | None = None  # manual promotions: who, when, why
    requested_at: str | None = None
    request_reason: str | None = None


def _logged(client: MlflowClient, name: str, version: str, metric: str) -> Measurement:
    """The metric (and its `<metric>_se`, when logged) of the run behind a version."""
    mv = client.get_model_version(name, version)
    metrics = client.get_run(mv.run_id).data.metrics
    if metric not in metrics:
        raise RegistryError(f"model {name!r} version {version} has no metric {metric!r} in run {mv.run_id}")
    se = metrics.get(f"{metric}_se")
    return Measurement(float(metrics[metric]), se=None if se is None else float(se))


def _write_decision(client: MlflowClient, decision: PromotionDecision, tags: dict[str, str]) -> None:
    """The decision as `promotion.*` tags on its version; fields it leaves empty lose the tag
    an earlier decision wrote, so the tags tell one story."""
    for k, v in asdict(decision).items():
        key = f"{PREFIX}{k}"
        if k in ("name", "version"):
            continue
        if v is not None:
            client.set_model_version_tag(decision.name, decision.version, key, str(v))
        elif key in tags:
            client.delete_model_version_tag(decision.name, decision.version, key)


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
    score: Callable[[str], Measurement | float] | None = None,
    *,
    force: bool = False,
    reason: str | None = None,
    by: str | None = None,
) -> PromotionDecision:
    """Apply the promotion gate to `version` (see `gate`): the first version becomes champion;
    a later one becomes `challenger` and takes `champion` only when it passed validation, is
    not a rerun of a rolled-back version (same data, params and code) and beats the champion
    by the margin on `promotion.metric` (lower is better).

    `score(version)` re-scores a version on the challenger's frozen evaluation snapshot, so the
    champion is measured on the same rows (and the SE is paired); without it, the metric (and
    SE) logged by each version's run is compared. A rolled-back version is refused with a
    `RegistryError` unless `force`, which needs a `reason` and skips the metric (never the
    validation). `by` marks a manual request (who); it is recorded with the reason. Decisions
    are `promotion.*` tags on the version; champion changes go into the champion history.
    """
    cfg = settings.promotion
    metric, version = cfg.metric, str(version)
    if force and not (reason and reason.strip()):
        raise RegistryError(f'forcing {name} v{version} needs a reason: --force --reason "why"')
    manual = force or by is not None or reason is not None
    request = (
        {"requested_by": by or current_user(), "requested_at": _now(), "request_reason": reason}
        if manual
        else {}
    )

    def measure(v: str) -> Measurement:
        if score is None:
            return _logged(client, name, v, metric)
        m = score(v)
        return m if isinstance(m, Measurement) else Measurement(float(m))

    with promotion_lock(settings, name):
        try:
            current = client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException as exc:
            if not missing(exc):  # a registry that did not answer is not "no champion yet"
                raise _unanswered(f"reading the champion of {name!r}", exc) from exc
            current = None
        champ = None if current is None else str(current.version)
        tags = client.get_model_version(name, version).tags
        # a version without a recorded validation result has not passed it
        validation = tags.get("validation", "not recorded")
        base = {"name": name, "version": version, "metric": metric, "forced": force, **request}
        event = {"by": request.get("requested_by", "pipeline"), "time": _now()}

        def refuse(why: str) -> PromotionDecision:
            """Refused: the version becomes `challenger` (when there is a champion to challenge)."""
            if champ is not None:
                client.set_registered_model_alias(name, CHALLENGER, version)
            return PromotionDecision(
                promoted=False, reason=why, champion_version=champ, status="refused", **base
            )

        if champ == version:
            decision = PromotionDecision(
                promoted=True, reason="already champion", champion_version=champ, status="champion", **base
            )
        elif is_rolled_back(tags) and not force:
            raise RegistryError(
                f"{name}: {_rollback_note(version, tags)}; it stays out of promotion. To make it "
                f'champion again: vaeflow promote --name {name} --version {version} --force --reason "why"'
            )
        elif validation != "passed":
            decision = refuse(
                f"validation {validation}: a version that failed validation is never promoted"
                + (" (not even with --force)" if force else "")
            )
        elif force:
            was_rolled_back = is_rolled_back(tags)
            why = f"forced by {request['requested_by']}: {reason} (the metric gate was not applied)"
            _move_champion(client, name, version, champ, {"action": "force", "reason": reason, **event})
            if was_rolled_back:
                client.set_model_version_tag(name, version, f"{PREFIX}rolled_back", "False")
                for key in ("rolled_back_to", "rollback_reason", "rollback_by", "rollback_at"):
                    if f"{PREFIX}{key}" in tags:
                        client.delete_model_version_tag(name, version, f"{PREFIX}{key}")
            decision = PromotionDecision(
                promoted=True, reason=why, champion_version=champ, status="champion", **base
            )
        elif champ is None:
            value = measure(version).value
            _move_champion(
                client, name, version, None, {"action": "promote", "reason": "first version", **event}
            )
            decision = PromotionDecision(
                promoted=True,
                reason="first version of the model",
                challenger_value=value,
                status="champion",
                **base,
            )
        elif (twin := _rerun_of_rolled_back(client, name, version, tags)) is not None:
            decision = refuse(
                f"same data, params and code as v{twin}, which was rolled back: a rerun of it "
                f'stays out until `vaeflow promote --name {name} --version {version} --force --reason "why"`'
            )
        elif same_lineage(tags, client.get_model_version(name, champ).tags):
            decision = refuse(
                f"same data, params and code as champion v{champ}: a rerun differs from it by "
                "training noise only (change the data or the configuration, or use --force --reason)"
            )
        else:
            new, old = measure(version), measure(champ)  # a version that cannot be measured moves no alias
            client.set_registered_model_alias(name, CHALLENGER, version)
            g = gate(new, old, cfg.min_improvement, cfg.se_multiplier)
            how = "re-scored on the same evaluation snapshot" if score else "as logged by each run"
            noise = (
                f"{cfg.se_multiplier:g} x SE {g.se:.5f} ({g.method}) + min_improvement {cfg.min_improvement:g}"
                if g.se is not None
                else f"min_improvement {cfg.min_improvement:g} ({g.method})"
            )
            reason_text = (
                f"{metric} {new.value:.5f} vs champion v{champ} {old.value:.5f} ({how}): improvement "
                f"{g.improvement:.5f} {'>' if g.passed else '<='} margin {g.margin:.5f} = {noise}; "
                f"{'improves' if g.passed else 'does not improve'} by more than the margin"
            )
            if g.passed:
                short = f"gate: {metric} -{g.improvement:.5f} vs v{champ}, margin {g.margin:.5f}"
                _move_champion(
                    client, name, version, champ, {"action": "promote", "reason": reason or short, **event}
                )
            decision = PromotionDecision(
                promoted=g.passed,
                reason=reason_text,
                challenger_value=new.value,
                champion_value=old.value,
                champion_version=champ,
                improvement=g.improvement,
                se=g.se,
                margin=g.margin,
                status="champion" if g.passed else "refused",
                **base,
            )
        if decision.reason != "already champion":  # its tags keep the decision that made it champion
            _write_decision(client, decision, tags)
            verdict = "promoted to champion" if decision.promoted else "not promoted"
            describe(client, name, version, "Promotion", f"{verdict}: {decision.reason}")
    log.info(
        "promotion of %s v%s: %s (%s)",
        name,
        version,
        "promoted" if decision.promoted else "refused",
        decision.reason,
    )
    return decision


def describe(client: MlflowClient, name: str, version: str, topic: str, text: str) -> None:
    """Set the `topic:` line of a version's description (what the registry UI shows first),
    keeping the other lines."""
    current = client.get_model_version(name, version).description or ""
    lines = [ln for ln in current.splitlines() if not ln.startswith(f"{topic}:")]
    client.update_model_version(name, version, description="\n".join([*lines, f"{topic}: {text}"]))


def rollback(
    client: MlflowClient,
    name: str,
    settings: Settings | None = None,
    reason: str | None = None,
    by: str | None = None,
) -> tuple[str, str]:
    """Move `champion` back to the previous champion still eligible; returns (from, to).

    The version rolled back from is marked (`promotion.rolled_back=True`, `status=rolled_back`,
    `promoted=False`, with the reason, who and when) and loses `challenger`; it stays out of
    promotion until a forced one. The rollback is an event of the champion history."""
    model_name(name)
    if settings is not None:
        with promotion_lock(settings, name):
            return rollback(client, name, reason=reason, by=by)
    try:
        current = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException as exc:
        raise RegistryError(f"model {name!r} does not exist or has no champion to roll back") from exc
    chain, target = champion_chain(history(client, name)), None
    while chain and target is None:
        candidate = chain.pop()
        if candidate == current:
            continue
        try:
            if not is_rolled_back(client.get_model_version(name, candidate).tags):
                target = candidate
        except MlflowException as exc:  # a deleted version cannot be champion again
            if not missing(exc):
                raise _unanswered(f"reading version {candidate} of {name!r}", exc) from exc
    if target is None:
        raise RegistryError(f"model {name!r} has no earlier champion than v{current} to roll back to")
    who, when = by or current_user(), _now()
    client.set_registered_model_alias(name, CHAMPION, target)
    if str(client.get_registered_model(name).aliases.get(CHALLENGER)) == current:
        client.delete_registered_model_alias(name, CHALLENGER)
    marks = {
        "status": "rolled_back",
        "promoted": "False",
        "rolled_back": "True",
        "rolled_back_to": target,
        "rollback_by": who,
        "rollback_at": when,
        "rollback_reason": (reason or "no reason given")[:_TAG_CHARS],
    }
    for key, value in marks.items():
        client.set_model_version_tag(name, current, f"{PREFIX}{key}", value)
    client.set_model_version_tag(name, target, f"{PREFIX}status", "champion")
    _record(
        client,
        name,
        {"version": current, "action": "rollback", "to": target, "reason": reason, "by": who, "time": when},
    )
    describe(
        client,
        name,
        current,
        "Promotion",
        f"rolled back to v{target} by {who} at {when}: {reason or 'no reason given'}",
    )
    log.info("rollback of %s: champion v%s -> v%s (%s)", name, current, target, reason or "no reason given")
    return current, target
