# rayline: `make demo` and `make test` work on a fresh machine (they create .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/fraud.yaml

.PHONY: install demo test test-fast serve lint format bench-preprocess bench-train bench-tune bench-online bench-serve bench-stream clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install  ## whole lifecycle on a local Ray, ending with a real HTTP prediction
	$(PY) -m serving.demo --config $(CONFIG)

test: install  ## the whole suite, slow tests included
	$(PY) -m pytest -q --durations=25

test-fast: install
	$(PY) -m pytest -q -m "not slow"

serve: install  ## keep the endpoint up on the config's host:port
	$(PY) -m serving.app --config $(CONFIG)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench-preprocess: install
	$(PY) -m benchmarks.preprocess

bench-train: install
	$(PY) -m benchmarks.train

bench-tune: install
	$(PY) -m benchmarks.tune

bench-online: install  ## compiled online scorer vs the batch path (needs `make demo`)
	$(PY) -m benchmarks.online --config $(CONFIG)

bench-serve: install  ## Serve endpoint vs bare FastAPI + uvicorn over HTTP (needs `make demo`, wrk)
	$(PY) -m benchmarks.serve --config $(CONFIG)

bench-stream: install  ## stream workers vs a plain redis-py consumer (after make demo, redis-server)
	$(PY) -m benchmarks.stream --storage artifacts/fraud

clean:
	rm -rf artifacts data .pytest_cache
