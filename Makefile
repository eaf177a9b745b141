# vaeflow: `make run` sets everything up and runs the pipeline; `make test` runs the tests.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
# Where pip finds torch (GPU users: TORCH_INDEX=https://download.pytorch.org/whl/cu128 TORCH=torch)
TORCH_INDEX ?=
# Extra pytest arguments for `make test`, e.g. PYTEST_ARGS='-m "not slow"'
PYTEST_ARGS ?=

.PHONY: setup run test lint bench clean

$(BIN)/vaeflow: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(BIN)/vaeflow

setup: $(BIN)/vaeflow ## create .venv and install vaeflow (torch first, pinned)

run: setup ## the whole pipeline on the embedded default (DuckDB + SQLite MLflow + ephemeral Prefect)
	$(BIN)/vaeflow run

# PostgreSQL for the tests marked `postgres`: VAEFLOW_TEST_PG, else the server on 127.0.0.1:5432,
# else a throwaway one (tests/pg_server.py). Skip them: make test PYTEST_ARGS='-m "not postgres"'
test: setup ## lint and the whole test suite (slow end-to-end tests included)
	$(BIN)/ruff check .
	$(BIN)/python tests/pg_server.py $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup ## quality (vs sklearn / PyOD / PCA), throughput and CLI-overhead benchmarks, printed as tables
	$(BIN)/python -m benchmarks.quality
	$(BIN)/python -m benchmarks.throughput
	$(BIN)/python -m benchmarks.cli_overhead

clean:
	rm -rf data/warehouse.duckdb* data/snapshots data/checkpoints data/models data/scratch mlflow.db mlartifacts reports/benchmarks
