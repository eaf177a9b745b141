"""Data validation with a Great Expectations 1.x suite kept in the repo.

`build_suite` derives a suite from a reference snapshot and gives each expectation a GX
severity: `critical` (blocks training) for the column set, row count, types, null-fraction
ceilings, categorical domains and non-negative bounds; `warning` (recorded, never blocks) for
the distribution: a value range from the reference quantiles and the median.
Distribution change is the drift monitor's and the promotion gate's to judge. The suite is
written to `gx/expectations/NAME.json` in GX's own format and reviewed like code.
`run_suite` validates a DataFrame through a GX Checkpoint, optionally rendering GX Data Docs,
and returns a report of blocking failures and warnings. GX is imported here only (it is slow).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import Settings, ValidationConfig
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
SUITE_FORMAT = 2  # meta["vaeflow_suite_format"]: expectations carry a blocking or warning severity
CRITICAL = "critical"  # GX's FailureSeverity values (and its default when a suite names none)
DOCS_SITE = "vaeflow"
LEGACY_NOTE = (
    "suite {suite} predates blocking/warning severities: its value ranges block (GX's default "
    "severity, critical); rebuild it with `vaeflow validate --rebuild` so distribution checks only warn"
)


def _num(v: Any) -> str:
    """A number to six significant digits, anything else as its repr."""
    return f"{v:.6g}" if isinstance(v, int | float | np.number) and not isinstance(v, bool) else repr(v)


@dataclass
class ExpectationOutcome:
    """One expectation's result, with its GX severity (`critical`, `warning` or `info`)."""

    expectation: str
    column: str | None
    success: bool
    severity: str = CRITICAL
    observed: Any = None
    unexpected_percent: float | None = None
    examples: list[Any] = field(default_factory=list)
    detail: str | None = None

    @property
    def blocking(self) -> bool:
        return not self.success and self.severity == CRITICAL

    def describe(self) -> str:
        where = f"({self.column})" if self.column else ""
        parts = []
        if self.unexpected_percent is not None:
            parts.append(f"{self.unexpected_percent:.2f}% of values unexpected")
        if self.detail:
            parts.append(self.detail)
        if self.observed is not None and self.unexpected_percent is None and not self.detail:
            parts.append(f"observed {self.observed!r}")
        if self.examples:
            parts.append(f"e.g. [{', '.join(_num(v) for v in self.examples[:5])}]")
        return f"{self.expectation}{where}" + (": " + ", ".join(parts) if parts else "")


@dataclass
class ValidationReport:
    """What GX found: `success` unless a critical expectation failed; warnings are recorded."""

    suite: str
    data: str
    success: bool
    outcomes: list[ExpectationOutcome]
    notes: list[str] = field(default_factory=list)
    data_docs: str | None = None  # folder of the rendered GX Data Docs (index.html)

    @property
    def failures(self) -> list[ExpectationOutcome]:
        """Failed critical expectations: these block."""
        return [o for o in self.outcomes if o.blocking]

    @property
    def warnings(self) -> list[ExpectationOutcome]:
        """Failed expectations of a lower severity: recorded, never blocking."""
        return [o for o in self.outcomes if not o.success and not o.blocking]

    def text(self) -> str:
        passed = sum(o.success for o in self.outcomes)
        head = (
            f"validation of {self.data} against suite {self.suite}: "
            f"{passed}/{len(self.outcomes)} expectations passed, "
            f"{len(self.failures)} blocking failure(s), {len(self.warnings)} warning(s)"
        )
        lines = [head] + [f"  FAILED {o.describe()}" for o in self.failures]
        lines += [f"  {o.severity.upper()} {o.describe()}" for o in self.warnings]
        lines += [f"  note: {n}" for n in self.notes]
        if self.data_docs:
            lines.append(f"  data docs: {Path(self.data_docs) / 'index.html'}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "data": self.data,
            "success": self.success,
            "evaluated": len(self.outcomes),
            "failed": len(self.failures),
            "warned": len(self.warnings),
            "failures": [asdict(o) for o in self.failures],
            "warnings": [asdict(o) for o in self.warnings],
            "notes": self.notes,
            "data_docs": self.data_docs,
            "outcomes": [asdict(o) for o in self.outcomes],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValidationReport:
        """The report `to_dict` wrote (one without `outcomes` keeps its failures only)."""
        known = {f.name for f in fields(ExpectationOutcome)}
        rows = data.get("outcomes", data.get("failures", []))
        outcomes = [ExpectationOutcome(**{k: v for k, v in o.items() if k in known}) for o in rows]
        return cls(
            data["suite"],
            data["data"],
            data["success"],
            outcomes,
            data.get("notes", []),
            data.get("data_docs"),
        )


def suite_path(settings: Settings, name: str) -> Path:
    return settings.path(settings.validation.suite_dir) / f"{name}.json"


def data_docs_dir(settings: Settings, name: str) -> Path:
    """The folder `validate_frame` renders NAME's GX Data Docs into (a static site: index.html)."""
    return settings.path("reports") / name / "data_docs"


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


def _round(v: float) -> float:
    """Six significant digits: bounds that read well in the suite's diff."""
    return float(f"{v:.6g}")


def _context():
    """An in-memory GX context: the suite lives in the repo, results go to the report and MLflow."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    for name, logger in logging.Logger.manager.loggerDict.items():  # some set INFO on their own
        if name.startswith("great_expectations") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # no "Calculating Metrics" bars
    return context


def _distribution(column: str, values: pd.Series, cfg: ValidationConfig) -> list:
    """Warning-severity expectations on a numeric column's distribution (quantile based)."""
    import great_expectations as gx
    from great_expectations.expectations.metadata_types import FailureSeverity

    E, q, warning = gx.expectations, cfg.range_quantile, FailureSeverity.WARNING
    lo, hi = values.quantile([q, 1 - q], interpolation="nearest")
    span = (hi - lo) or (values.max() - values.min()) or max(abs(hi), 1.0)
    pad = cfg.range_widen * span
    found = [
        E.ExpectColumnValuesToBeBetween(
            column=column,
            min_value=_round(lo - pad),
            max_value=_round(hi + pad),
            mostly=cfg.range_mostly,
            severity=warning,
        )
    ]
    if cfg.median_tolerance is not None:  # (GX 1.24's quantile expectation cannot be stored: numpy bool)
        median, tol = values.median(), cfg.median_tolerance * span
        found.append(
            E.ExpectColumnMedianToBeBetween(
                column=column,
                min_value=_round(median - tol),
                max_value=_round(median + tol),
                severity=warning,
            )
        )
    return found


def build_suite(reference: pd.DataFrame, schema: TableSchema, settings: Settings, name: str) -> dict:
    """A GX suite (as GX's JSON dict) derived from a reference table and its fitted schema.

    Critical: column set, row count, types, null-fraction ceilings, categorical domains and,
    where the reference has no negative value, a non-negative bound. Warning: the distribution.
    """
    import great_expectations as gx
    from great_expectations.expectations.metadata_types import FailureSeverity

    _context()
    cfg = settings.validation
    E, critical = gx.expectations, FailureSeverity.CRITICAL
    suite = gx.ExpectationSuite(
        name=name, meta={"generated_by": "vaeflow validate --rebuild", "vaeflow_suite_format": SUITE_FORMAT}
    )
    add = suite.add_expectation
    add(E.ExpectTableColumnsToMatchSet(column_set=schema.input_columns, exact_match=False, severity=critical))
    add(E.ExpectTableRowCountToBeBetween(min_value=1, severity=critical))
    for spec in schema.columns:
        s = reference[spec.name]
        type_list = _type_list(s, spec.kind, spec.categories)
        add(E.ExpectColumnValuesToBeInTypeList(column=spec.name, type_list=type_list, severity=critical))
        ceiling = min(1.0, float(s.isna().mean()) + cfg.null_fraction_slack)
        if ceiling < 1.0:
            add(
                E.ExpectColumnValuesToNotBeNull(
                    column=spec.name, mostly=round(1 - ceiling, 6), severity=critical
                )
            )
        if spec.kind == "numeric":
            values = pd.to_numeric(s, errors="coerce").dropna()
            if values.empty:
                continue
            if values.min() >= 0:  # a physical bound (counts, durations, amounts): negatives are errors
                add(
                    E.ExpectColumnValuesToBeBetween(
                        column=spec.name, min_value=0, mostly=cfg.bound_mostly, severity=critical
                    )
                )
            for expectation in _distribution(spec.name, values, cfg):
                add(expectation)
        else:
            add(
                E.ExpectColumnValuesToBeInSet(
                    column=spec.name,
                    value_set=[_json_safe(v) for v in spec.categories],
                    mostly=cfg.domain_mostly,
                    severity=critical,
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


def _detail(kind: str, kwargs: dict, res: dict) -> str | None:
    """What a reader needs beyond the share of unexpected values: the bound, the missing columns."""
    if kind in ("expect_column_values_to_be_between", "expect_column_median_to_be_between"):
        lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
        bound = (
            f"in [{_num(lo)}, {_num(hi)}]"
            if None not in (lo, hi)
            else f">= {_num(lo)}"
            if hi is None
            else f"<= {_num(hi)}"
        )
        observed = res.get("observed_value")
        return (f"observed {_num(observed)}, " if observed is not None else "") + f"expected {bound}"
    if kind == "expect_table_columns_to_match_set":
        missing = ((res.get("details") or {}).get("mismatched") or {}).get("missing")
        return f"missing columns {missing}" if missing else None
    return None


def _outcome(r: Any) -> ExpectationOutcome:
    """A GX ExpectationValidationResult as an outcome (an error raised by GX counts as a failure)."""
    config, res = r.expectation_config, r.result or {}
    severity = config.severity
    outcome = ExpectationOutcome(
        expectation=config.type,
        column=config.kwargs.get("column"),
        success=bool(r.success),
        severity=getattr(severity, "value", severity or CRITICAL),
        observed=_json_safe(res.get("observed_value")),
        unexpected_percent=res.get("unexpected_percent"),
        examples=[_json_safe(v) for v in (res.get("partial_unexpected_list") or [])[:5]],
        detail=_detail(config.type, config.kwargs, res),
    )
    info = r.exception_info or {}
    raised = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    messages = sorted({e.get("exception_message") for e in raised if e.get("raised_exception")})
    if messages:
        outcome.success = False
        outcome.detail = "; ".join(messages)
    return outcome


def run_suite(
    df: pd.DataFrame, suite: dict, data_name: str, suite_name: str, docs_dir: Path | None = None
) -> ValidationReport:
    """Validate `df` against a suite dict with a GX Checkpoint in an ephemeral context.

    With `docs_dir`, the Checkpoint's UpdateDataDocsAction renders the result as GX Data Docs
    (a static HTML site) into that folder, replacing what was there.
    """
    import great_expectations as gx

    context = _context()
    gx_suite = context.suites.add(
        gx.ExpectationSuite(
            name=suite["name"], expectations=suite["expectations"], meta=suite.get("meta") or {}
        )
    )
    # GX 1.x cannot name pandas 3's default string dtype in a type list: hand it object columns
    strings = {c: object for c in df.columns if pd.api.types.is_string_dtype(df[c]) and df[c].dtype != object}
    df = df.astype(strings) if strings else df
    asset = context.data_sources.add_pandas(name="vaeflow").add_dataframe_asset(name=data_name)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(
            name=data_name, data=asset.add_batch_definition_whole_dataframe("all"), suite=gx_suite
        )
    )

    from great_expectations.expectations.metadata_types import FailureSeverity

    from pipelines import atomic

    with atomic.atomic_dir(docs_dir) if docs_dir is not None else contextlib.nullcontext() as site:
        actions = []
        if site is not None:
            store = {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(site)}
            context.add_data_docs_site(DOCS_SITE, {"class_name": "SiteBuilder", "store_backend": store})
            actions.append(gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE]))
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=data_name, validation_definitions=[definition], actions=actions, result_format="SUMMARY"
            )
        )
        result = next(iter(checkpoint.run(batch_parameters={"dataframe": df}).run_results.values()))
    # table-level expectations first, then by column: the order a reader checks them in
    outcomes = sorted(
        (_outcome(r) for r in result.results), key=lambda o: (o.column is not None, o.column or "")
    )
    notes = []
    if (suite.get("meta") or {}).get("vaeflow_suite_format") is None:
        notes.append(LEGACY_NOTE.format(suite=suite_name))
    # GX fails a validation on any failed expectation; only its most severe failure being critical blocks
    blocked = result.get_max_severity_failure() == FailureSeverity.CRITICAL
    return ValidationReport(
        suite_name, data_name, not blocked, outcomes, notes, str(docs_dir) if docs_dir is not None else None
    )


def validate_frame(
    df: pd.DataFrame, schema: TableSchema, settings: Settings, name: str, *, rebuild: bool = False
) -> ValidationReport:
    """Validate against `gx/expectations/NAME.json`, building the suite from `df` if absent.

    Renders Data Docs to `data_docs_dir` when `validation.data_docs` is set; logs each warning.
    Raises DataValidationError with the readable report when a critical expectation fails.
    """
    path = suite_path(settings, name)
    if rebuild or not path.exists():
        save_suite(build_suite(df, schema, settings, name), path)
        log.warning("wrote expectation suite %s from this data: review and commit it", path)
    docs = data_docs_dir(settings, name) if settings.validation.data_docs else None
    report = run_suite(df, load_suite(path), data_name=name, suite_name=str(path), docs_dir=docs)
    for note in report.notes:
        log.warning(note)
    if not report.success:
        raise DataValidationError(report.text())
    for outcome in report.warnings:
        log.warning("validation %s of %s (does not block): %s", outcome.severity, name, outcome.describe())
    return report
