# One-command entry points. `make demo` installs and runs the main job; `make test` installs and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PIP    := $(VENV)/bin/pip
PY     := $(VENV)/bin/python

.PHONY: install demo test test-fast bench clean

install: $(VENV)/.installed

# torch is pinned on the same line: a bare `torch` lets pip pull the CUDA build (gigabytes) on CPU machines.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --disable-pip-version-check -q "torch==2.13.0" -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/mplug2-demo

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

bench: install
	$(PY) -m bench

clean:
	rm -rf $(VENV) outputs .s3 .pytest_cache
