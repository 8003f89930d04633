# Shortcuts for developers; CI runs .ci/run.
.PHONY: install test lint format typecheck

install:
	python3 -m venv .venv && .venv/bin/pip install -e '.[test]'

test:
	.venv/bin/pytest

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

format:
	.venv/bin/ruff check --fix . && .venv/bin/ruff format .
