# campus-iot — the two commands a newcomer needs are `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo test lint bench clean help

help:
	@echo "make demo     set everything up, then run simulated classrooms, a broker, the fleet and an agent"
	@echo "make test     set everything up, then run the whole test suite"
	@echo "make lint     ruff and mypy"
	@echo "make install  only the set-up (Debian packages when missing, .venv)"

install:
	@scripts/install.sh

demo: install
	@$(VENV)/bin/campus-sim demo

test: install
	@$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .
	@$(VENV)/bin/mypy

bench: install
	@for b in benchmarks/[!_]*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info .demo
