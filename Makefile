# Quick start:  make repro   (install + run the default pipeline)
#               make test    (install + run the test suite)
#               make lint    (install + ruff check)
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Stage commands in dvc.yaml call `python`: it must be the venv's.
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup system-deps repro plots lint test test-all bench clean-venv

setup: $(VENV)/.installed

# Open3D needs the system library libusb-1.0. Installed when we are root and it is missing;
# otherwise the exact command is printed.
system-deps:
	@if ! ldconfig -p 2>/dev/null | grep -q libusb-1.0.so.0; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq libusb-1.0-0; \
	  else echo "Open3D needs libusb-1.0: run  sudo apt-get install -y libusb-1.0-0"; exit 1; fi; \
	fi

$(VENV)/.installed: pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

# params.yaml is checked first: DVC reads it while loading dvc.yaml, and a typo such as
# `datasets: [synthetc]` would otherwise be DVC's "Parameters 'data.synthetc' are missing".
# A second `make repro` in the same workspace waits for the running one (DVC alone would fail
# with "... is busy"); ARGS passes targets or options: make repro ARGS="exp_mfh_gamma".
ARGS ?=
repro: setup
	$(BIN)/python -m stages validate
	$(BIN)/python -m flows.lock $(BIN)/dvc repro $(ARGS)

# Every plot of the last run in dvc_plots/index.html (opens offline).
plots: setup
	$(BIN)/python -m flows.lock $(BIN)/dvc repro plots_page
	$(BIN)/dvc plots show

# ruff, configured in pyproject.toml ([tool.ruff]).
lint: setup
	$(BIN)/ruff check .

test: setup
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest -m ""

# ARGS passes options: make bench ARGS=--quick (reduced sizes), make bench ARGS="--only loader".
bench: setup
	$(BIN)/python benchmarks/run_all.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
