# One-command entry points. `make demo` installs and runs the main job; `make test` installs and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PIP    := $(VENV)/bin/pip
PY     := $(VENV)/bin/python
# pytest-xdist workers for `make test`: whole modules run two at a time on the 2-core CI machine (tests/conftest.py)
TEST_WORKERS ?= 2

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
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

test-fast: install
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow"

bench: install
	$(PY) -m bench

clean:
	rm -rf $(VENV) outputs .s3 .pytest_cache
