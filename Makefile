# Entry points, each one command on a fresh machine (they install what they need first):
#   make install   make run   make test   make test-fast   make lint
PYTHON ?= python3
VENV ?= .venv

.PHONY: install run test test-fast lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[test]'
	touch $@

run: install
	$(VENV)/bin/dtrain launch recipes/mnist_cnn.py $(ARGS)

test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: install
	$(VENV)/bin/pytest tests/fast $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q tests/fast/test_floors.py tests/fast/test_names.py
