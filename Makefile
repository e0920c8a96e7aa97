# One environment: .venv. `make test` is the README's test command; CI calls it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint typecheck validate-deploy gpu-check demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[dev,distributed]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --timeout=600 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check app model indexer synth tests bench

typecheck: $(STAMP)
	$(BIN)/mypy app indexer model synth

# hadolint on the Dockerfiles, docker-compose.yml through docker-compose and the compose-spec schema.
validate-deploy: $(STAMP)
	VENV_BIN=$(BIN) bash scripts/validate_deploy.sh

# On a machine with an NVIDIA GPU: CUDA probe, FAISS on the GPU, `pytest -m gpu`, benchmarks.
gpu-check: $(STAMP)
	PYTHON=$(BIN)/python bash scripts/gpu_check.sh

# Sample library -> index -> API and demo page at http://127.0.0.1:8000/ (TVS_HOST, TVS_PORT, TVS_DATA_DIR,
# TVS_MODEL change the defaults; see scripts/demo.sh).
demo: $(STAMP)
	VENV=$(VENV) bash scripts/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
