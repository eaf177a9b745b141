"""The MLflow model registry: aliases and tags (no stages).

`champion` is the version batch jobs score with; a new version gets `challenger` and takes
`champion` only through the promotion gate. Every decision is recorded as tags on the version,
and the champion history (a registered-model tag) makes `rollback` possible.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines.config import Settings
from pipelines.errors import RegistryError

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "vaeflow.champion_history"
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


def get_client(settings: Settings) -> MlflowClient:
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


def promote(client: MlflowClient, name: str, version: str, settings: Settings) -> PromotionDecision:
    """Apply the promotion rule to `version`: first version -> champion; else the metric gate."""
    metric, margin = settings.promotion.metric, settings.promotion.min_improvement
    version = str(version)
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    value = _metric(client, name, version, metric)
    if current is None:
        _set_champion(client, name, version)
        decision = PromotionDecision(name, version, True, "first version of the model", metric, value)
    elif str(current.version) == version:
        decision = PromotionDecision(name, version, True, "already champion", metric, value, value, version)
    else:
        client.set_registered_model_alias(name, CHALLENGER, version)
        champ = _metric(client, name, str(current.version), metric)
        better = value < champ - margin
        if better:
            _set_champion(client, name, version)
        reason = (
            f"{metric} {value:.5f} vs champion v{current.version} {champ:.5f} "
            f"({'improves' if better else 'does not improve'} by more than {margin})"
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


def rollback(client: MlflowClient, name: str) -> tuple[str, str]:
    """Move `champion` back to the previous champion; returns (from_version, to_version)."""
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
