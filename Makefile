# Two commands for a newcomer: `make demo` (set up, then run the main job) and `make test` (set up, then every check).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
LATEST := .venv-latest
PIP := -qq --disable-pip-version-check

export IPYTHONDIR := $(CURDIR)/.cache/ipython
export MPLBACKEND := Agg
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup demo test sync nbtest docs dist latest pytest bench
VERSION := $(shell sed -n 's/^version *= *//p' settings.ini)
WHEEL := dist/label_smoothing_fa-$(VERSION)-py3-none-any.whl

## Development environment: pinned (constraints-dev.txt), package installed editable. Re-running is a no-op.
setup: $(VENV)/.done
$(VENV)/.done: constraints-dev.txt settings.ini setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP) -c constraints-dev.txt -e ".[dev]"
	$(BIN)/pip check
	mkdir -p $(IPYTHONDIR)
	touch $@

## The main job: train on the digits data with plain CE and with label smoothing, print and plot.
demo: setup
	$(BIN)/python -m label_smoothing_fa.demo

## Everything CI checks; the output ends with pytest's summary line.
test: setup sync nbtest docs dist latest pytest

## Exported modules, cleaned notebooks and README.md must already match the notebooks.
sync: setup
	$(BIN)/python tools/check_sync.py

## Every notebook runs top to bottom.
nbtest: setup
	$(BIN)/nbdev_test --n_workers 2 --timing

## The docs site (Sphinx + MyST-NB over nbdev's processed notebooks) and its check.
docs: setup
	$(BIN)/python tools/build_docs.py
	$(BIN)/python tools/check_docs.py

## The release files: sdist and wheel in dist/, built from the tree as `python -m build` does, checked by twine.
dist: $(WHEEL)
$(WHEEL): $(VENV)/.done settings.ini setup.py pyproject.toml MANIFEST.in README.md LICENSE CHANGELOG.md \
          $(wildcard label_smoothing_fa/*.py)
	rm -rf dist
	$(BIN)/python -m build -q --outdir dist . >/dev/null
	$(BIN)/twine check --strict dist/*

## The newest fastai (fastcore 2.x, no nbdev): install the BUILT WHEEL there and run the pytest suite against it
## (from tests/, so that the installed package is imported, not the source tree).
latest: $(LATEST)/.done
	cd tests && $(CURDIR)/$(LATEST)/bin/python -c \
	  "import label_smoothing_fa as m; assert '/site-packages/' in m.__file__, f'not the wheel: {m.__file__}'"
	cd tests && $(CURDIR)/$(LATEST)/bin/python -m pytest -q -p no:cacheprovider .
$(LATEST)/.done: constraints-latest.txt $(WHEEL)
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip uninstall $(PIP) -y label_smoothing_fa 2>/dev/null || true
	$(LATEST)/bin/pip install $(PIP) -c constraints-latest.txt $(WHEEL) pytest hypothesis scikit-learn torchmetrics relplot accelerate
	$(LATEST)/bin/pip check
	touch $@

pytest: setup
	$(BIN)/python -m pytest tests

bench: setup
	$(BIN)/python benchmarks/bench_loss.py
	$(BIN)/python benchmarks/bench_callback.py
