# Two commands do everything on a fresh machine: `make demo` and `make test`.
# The virtual environment gets a CPU build of torch when it has no torch yet, so set-up never
# pulls CUDA packages on a CPU machine (on a CUDA machine, install torch first to keep yours).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_CPU ?= torch==2.13.0

.PHONY: demo test lint setup clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/decoderscope demo

lint: $(STAMP)
	$(VENV)/bin/ruff check decoderscope tests benchmarks examples
	$(VENV)/bin/ruff format --check decoderscope tests benchmarks examples
	$(VENV)/bin/mypy decoderscope

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-output .pytest_cache .mypy_cache .ruff_cache
