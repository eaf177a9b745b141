"""Data validation with a Great Expectations 1.x suite kept in the repo.

`build_suite` derives a suite from a reference snapshot (column set and types, ranges,
null-fraction ceilings, categorical domains); it is written to `gx/expectations/NAME.json`
in GX's own suite format and then reviewed like code. `run_suite` validates a DataFrame and
returns a report that lists each failed expectation. GX is imported here only (it is slow).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import Settings
from pipelines.errors import DataValidationError, SourceError
from vae_models.schema import TableSchema

log = logging.getLogger(__name__)

NUMERIC_TYPES = [
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
    "float16", "float32", "float64", "Float32", "Float64",
]  # fmt: skip
TEXT_TYPES = ["object", "str", "string", "category"]
BOOL_TYPES = ["bool", "boolean"]


@dataclass
class ExpectationOutcome:
    expectation: str
    column: str | None
    success: bool
    observed: Any = None
    unexpected_percent: float | None = None
    examples: list[Any] = field(default_factory=list)

    def describe(self) -> str:
        where = f"({self.column})" if self.column else ""
        parts = [f"{self.expectation}{where}"]
        if self.unexpected_percent is not None:
            parts.append(f"{self.unexpected_percent:.2f}% of values unexpected")
        if self.examples:
            parts.append(f"e.g. {self.examples[:5]}")
        if self.observed is not None and self.unexpected_percent is None:
            parts.append(f"observed {self.observed!r}")
        return ": ".join(parts[:1]) + (": " + ", ".join(parts[1:]) if len(parts) > 1 else "")


@dataclass
class ValidationReport:
    """What GX found: overall success and one outcome per expectation."""

    suite: str
    data: str
    success: bool
    outcomes: list[ExpectationOutcome]

    @property
    def failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def text(self) -> str:
        head = (
            f"validation of {self.data} against suite {self.suite}: "
            f"{len(self.outcomes) - len(self.failures)}/{len(self.outcomes)} expectations passed"
        )
        return "\n".join([head] + [f"  FAILED {o.describe()}" for o in self.failures])

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "data": self.data,
            "success": self.success,
            "evaluated": len(self.outcomes),
            "failed": len(self.failures),
            "failures": [asdict(o) for o in self.failures],
        }


def suite_path(settings: Settings, name: str) -> Path:
    return settings.path(settings.validation.suite_dir) / f"{name}.json"


def _type_list(series: pd.Series, kind: str, levels: list[Any]) -> list[str]:
    if kind == "numeric":
        return NUMERIC_TYPES
    if levels and all(isinstance(v, bool) for v in levels):
        return BOOL_TYPES + NUMERIC_TYPES + TEXT_TYPES
    if levels and all(isinstance(v, int | float) and not isinstance(v, bool) for v in levels):
        return NUMERIC_TYPES
    return TEXT_TYPES


def _json_safe(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _context():
    """An in-memory GX context: the suite lives in the repo, results go to the report and MLflow."""
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    return gx.get_context(mode="ephemeral")


def build_suite(reference: pd.DataFrame, schema: TableSchema, settings: Settings, name: str) -> dict:
    """A GX suite (as GX's JSON dict) derived from a reference table and its fitted schema."""
    import great_expectations as gx

    _context()
    cfg = settings.validation
    E = gx.expectations
    suite = gx.ExpectationSuite(name=name, meta={"generated_by": "vaeflow validate --rebuild"})
    suite.add_expectation(E.ExpectTableColumnsToMatchSet(column_set=schema.input_columns, exact_match=False))
    suite.add_expectation(E.ExpectTableRowCountToBeBetween(min_value=1))
    for spec in schema.columns:
        s = reference[spec.name]
        suite.add_expectation(
            E.ExpectColumnValuesToBeInTypeList(
                column=spec.name, type_list=_type_list(s, spec.kind, spec.categories)
            )
        )
        null_frac = float(s.isna().mean())
        ceiling = min(1.0, null_frac + cfg.null_fraction_slack)
        if ceiling < 1.0:
            suite.add_expectation(
                E.ExpectColumnValuesToNotBeNull(column=spec.name, mostly=round(1 - ceiling, 6))
            )
        if spec.kind == "numeric":
            values = pd.to_numeric(s, errors="coerce").dropna()
            lo, hi = float(values.min()), float(values.max())
            pad = cfg.range_slack * max(hi - lo, abs(hi), abs(lo), 1e-9)
            suite.add_expectation(
                E.ExpectColumnValuesToBeBetween(
                    column=spec.name, min_value=lo - pad, max_value=hi + pad, mostly=cfg.range_mostly
                )
            )
        else:
            suite.add_expectation(
                E.ExpectColumnValuesToBeInSet(
                    column=spec.name,
                    value_set=[_json_safe(v) for v in spec.categories],
                    mostly=cfg.domain_mostly,
                )
            )
    return suite.to_json_dict()


def save_suite(suite: dict, path: Path) -> Path:
    """Write a suite JSON atomically (with the umask's permissions, as a text editor would)."""
    from pipelines import atomic

    return atomic.write_text(path, json.dumps(suite, indent=2, default=str) + "\n")


def load_suite(path: Path) -> dict:
    if not path.is_file():
        raise SourceError(
            f"expectation suite {path} does not exist; build it with `vaeflow validate --rebuild`"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SourceError(f"expectation suite {path} is not valid JSON: {exc}") from exc


def run_suite(df: pd.DataFrame, suite: dict, data_name: str, suite_name: str) -> ValidationReport:
    """Validate `df` against a suite dict with an ephemeral GX context."""
    import great_expectations as gx

    context = _context()
    gx_suite = gx.ExpectationSuite(
        name=suite["name"], expectations=suite["expectations"], meta=suite.get("meta") or {}
    )
    # GX 1.x cannot name pandas 3's default string dtype in a type list: hand it object columns
    strings = {c: object for c in df.columns if pd.api.types.is_string_dtype(df[c]) and df[c].dtype != object}
    df = df.astype(strings) if strings else df
    source = context.data_sources.add_pandas(name="vaeflow")
    asset = source.add_dataframe_asset(name=data_name)
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": df})
    result = batch.validate(gx_suite, result_format="SUMMARY")
    outcomes = []
    for r in result.results:
        res = r.result or {}
        outcomes.append(
            ExpectationOutcome(
                expectation=r.expectation_config.type,
                column=r.expectation_config.kwargs.get("column"),
                success=bool(r.success),
                observed=_json_safe(res.get("observed_value")),
                unexpected_percent=res.get("unexpected_percent"),
                examples=[_json_safe(v) for v in (res.get("partial_unexpected_list") or [])[:5]],
            )
        )
        if r.exception_info and r.exception_info.get("raised_exception"):
            outcomes[-1].success = False
            outcomes[-1].observed = r.exception_info.get("exception_message")
    return ValidationReport(suite_name, data_name, bool(result.success), outcomes)


def validate_frame(
    df: pd.DataFrame, schema: TableSchema, settings: Settings, name: str, *, rebuild: bool = False
) -> ValidationReport:
    """Validate against `gx/expectations/NAME.json`, building the suite from `df` if absent.

    Raises DataValidationError with the readable report when any expectation fails.
    """
    path = suite_path(settings, name)
    if rebuild or not path.exists():
        save_suite(build_suite(df, schema, settings, name), path)
        log.warning("wrote expectation suite %s from this data: review and commit it", path)
    report = run_suite(df, load_suite(path), data_name=name, suite_name=str(path))
    if not report.success:
        raise DataValidationError(report.text())
    return report
