# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch pinned to the build that installs from this machine's local disk; other machines get it from PyPI.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo demo-quick test bench clean

$(BIN)/rankone: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,examples,plot]'
	touch $(BIN)/rankone

install: $(BIN)/rankone

demo: install
	$(BIN)/rankone demo

demo-quick: install
	$(BIN)/rankone demo --quick

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/run.py
	$(BIN)/python bench/startup.py

clean:
	rm -rf $(VENV) rankone-work .pytest_cache
