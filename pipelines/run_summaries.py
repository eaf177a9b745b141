"""What a run did, as markdown for Prefect artifacts (the flow run's Artifacts tab): the GX
result, the training run, the promotion decision with both scores, the drift report and the
scored tables. Plain functions of the stages' results; `flows.py` publishes them."""

from __future__ import annotations

import math
import re
from typing import Any


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) from names: the same key on
    every run, so the UI keeps each key's history."""
    text = "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts if p)
    return text[:100].strip("-") or "vaeflow"


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.5g}" if math.isfinite(value) else str(value)
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_num(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(out)


def validation_markdown(report: dict[str, Any]) -> str:
    """A GX validation result (`ValidationReport.to_dict()`): verdict, then each failure."""
    failures = report.get("failures", [])
    warnings = report.get("warnings", [])
    verdict = "passed" if report["success"] else "FAILED (training blocked)"
    lines = [
        f"# Validation of `{report['data']}`: {verdict}",
        f"Suite `{report['suite']}`: {report['evaluated'] - report['failed'] - report.get('warned', 0)} of "
        f"{report['evaluated']} expectations met ({report['failed']} blocking, {report.get('warned', 0)} warnings).",
    ]
    for title, items in (("Blocking failures", failures), ("Warnings", warnings)):
        if items:
            rows = [
                [o["expectation"], o.get("column") or "", o.get("unexpected_percent"), o.get("observed")]
                for o in items
            ]
            lines += ["", f"## {title}", _table(["expectation", "column", "% unexpected", "observed"], rows)]
    return "\n".join(lines)


def failed_validation_markdown(data: str, text: str) -> str:
    """A validation that raised: the report text the user saw."""
    return f"# Validation of `{data}`: FAILED (training blocked)\n\n```\n{text}\n```"


def training_markdown(name: str, version: str, run_id: str, metrics: dict[str, float]) -> str:
    """The registered version and its evaluation metrics."""
    rows = [[k, v] for k, v in sorted(metrics.items())]
    return f"# {name} v{version} registered (MLflow run `{run_id}`)\n\n" + _table(["metric", "value"], rows)


def promotion_markdown(decision: dict[str, Any]) -> str:
    """A promotion decision (`PromotionDecision` as a dict) with both scores."""
    verdict = "PROMOTED to champion" if decision["promoted"] else "not promoted"
    rows = [
        [f"v{decision['version']} (challenger)", decision.get("challenger_value")],
        [
            f"v{decision['champion_version']} (champion)" if decision.get("champion_version") else "champion",
            decision.get("champion_value"),
        ],
    ]
    gate = [
        [label, decision.get(field)]
        for label, field in (("improvement", "improvement"), ("standard error", "se"), ("margin", "margin"))
        if decision.get(field) is not None
    ]
    text = f"# {decision['name']} v{decision['version']}: {verdict}\n\n{decision['reason']}\n\n"
    text += _table(["version", decision["metric"]], rows)
    return text + ("\n\n" + _table(["gate", "value"], gate) if gate else "")


def drift_markdown(report: dict[str, Any], model: str) -> str:
    """A drift report (`DriftReport.to_dict()`): verdict, reasons and each column's statistic."""
    verdict = "DETECTED" if report["drifted"] else "not detected"
    lines = [
        f"# Drift against {model}'s training data: {verdict}",
        f"{report['drifted_share']:.0%} of columns drifted; largest latent KS "
        f"{report['latent_statistic']:.3f}; {report['current_rows']} rows vs {report['reference_rows']} reference rows.",
    ]
    lines += [f"- {r}" for r in report.get("reasons", [])]
    rows = [
        [c, d["method"], d["statistic"], d["null_fraction_change"], d["drifted"]]
        for c, d in report["columns"].items()
    ]
    lines += ["", _table(["column", "test", "statistic", "null-fraction change", "drifted"], rows)]
    return "\n".join(lines)


def scored_table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per batch job (`JobResult` dicts) for a Prefect table artifact."""
    return [
        {
            "job": r["job"],
            "destination": r["destination"],
            "rows": r["rows"],
            "rows_per_second": round(r["rows"] / r["seconds"]) if r["seconds"] > 0 else None,
            "seconds": round(r["seconds"], 2),
            "model_version": r["model_version"],
            "importance_samples": r.get("importance_samples") or None,
        }
        for r in results
    ]
