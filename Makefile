# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q $(TORCH) -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The main job: train the tiny MoE on the Python stdlib source (8 MB of it), evaluate,
# checkpoint, plot, sample. A rerun starts afresh in runs/demo.
demo: install
	rm -rf runs/demo
	$(BIN)/moeforge train --preset tiny --out runs/demo --max-bytes 8000000 --steps 300 --eval-every 50

test: install-test
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) *.egg-info
