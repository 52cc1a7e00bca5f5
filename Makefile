# Two commands: `make run` (set up .venv, run the default job) and `make test` (set up, run tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench ui mlflow-server clean-outputs

# Re-install when pyproject.toml changes. Needs the package index only (no other network).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/finetune $(ARGS)

# Two pytest-xdist workers; each test module stays on one worker (its fixtures are built once);
# what several modules share is built once per session (tests/conftest.py built_once).
# PYTEST_ARGS="-n 0" runs in one process.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

# Benchmarks (slow, not in `make test`): decode tokens/s on the real stories260K Llama.
bench: $(STAMP)
	$(BIN)/python -m pytest -q -s -m slow tests/test_bench.py

# MLflow UI on the default local store (outputs/mlflow.db): http://127.0.0.1:5000
ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/outputs/mlflow.db --host 127.0.0.1 --port 5000

# A tracking server on loopback (SQLite backend, artifacts stored by the server under outputs/server):
# jobs log to it with `make run ARGS="tracking.uri=http://127.0.0.1:5001"`; its UI is at that address.
# Another port: `make mlflow-server MLFLOW_PORT=5002`. Stop it with Ctrl-C.
MLFLOW_PORT ?= 5001
mlflow-server: $(STAMP)
	mkdir -p outputs/server
	$(BIN)/mlflow server --backend-store-uri sqlite:///$(CURDIR)/outputs/server/mlflow.db \
		--artifacts-destination $(CURDIR)/outputs/server/artifacts --host 127.0.0.1 --port $(MLFLOW_PORT)

clean-outputs:
	rm -rf outputs/runs outputs/multirun outputs/cache outputs/mlflow.db outputs/mlartifacts
