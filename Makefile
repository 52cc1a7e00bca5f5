# Two commands: `make run` (set up .venv, run the default job) and `make test` (set up, run tests;
# `make test-fast`: the in-process tier only; `make test-shuffled SEED=N`: in a shuffled order).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The PyTorch side of the benchmarks, in a venv of its own (never in .venv; see pyproject.toml)
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

.PHONY: run test test-fast test-shuffled bench bench-train bench-venv ui mlflow-server clean-outputs

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
# .venv-bench too: tests/test_bench_smoke.py runs the benchmarks' PyTorch side.
test: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 $(PYTEST_ARGS)

# The fast in-process tier (~2 min): no `finetune` subprocess, no msrun, no MLflow server, no other
# Python (marked `process`; tests/helpers.py fails an unmarked test that starts one), and no
# MindSpore model (marked `slow`: the tests that compile graphs, minutes together).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=10 -m "not process and not slow" $(PYTEST_ARGS)

# Everything in an order shuffled by pytest-randomly (modules, and tests within each module), from
# SEED (random if not given; printed before and after, so a failing order can be run again).
# `make test-shuffled SEED=123 PYTEST_ARGS='-m "not process"'` shuffles the in-process tests only.
test-shuffled: $(STAMP) $(BENCH_STAMP)
	@seed=$(if $(SEED),$(SEED),$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')); \
	echo "test order shuffled with SEED=$$seed"; \
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -p randomly --randomly-seed=$$seed $(PYTEST_ARGS); \
	status=$$?; echo "test order was shuffled with SEED=$$seed (again: make test-shuffled SEED=$$seed)"; exit $$status

# Benchmarks (minutes, not in `make test`; see BENCHMARKS.md): the tool vs PyTorch + PEFT on MMLU rows,
# MFU, multiple-choice evaluation, decode, data preparation -> bench/results/*.json + BENCHMARKS.md.
# The PyTorch side runs in its own venv (.venv-bench, bench/requirements-peft.txt), never in .venv.
$(BENCH_STAMP): bench/requirements-peft.txt
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet -r bench/requirements-peft.txt
	touch $(BENCH_STAMP)

bench-venv: $(BENCH_STAMP)

bench: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python -m bench all $(BENCH_ARGS)

bench-train: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python -m bench train $(BENCH_ARGS)

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
