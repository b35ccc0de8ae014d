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

.PHONY: setup demo test lint sync nbtest docs dist latest-env latest pytest bench gpu
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

## Everything CI checks, one stage after another, each within the machine's cores: no stage runs more processes x
## torch threads than there are cores (TORCH_THREADS each; the notebooks: two at a time, one thread each). The wall
## time of each stage is printed at the end, just before pytest's summary line, which stays the output's last line.
CORES := $(shell nproc 2>/dev/null || echo 2)
TORCH_THREADS ?= $(CORES)
STAGES := setup lint sync nbtest docs dist latest-env latest
TIMES := .cache/stage_times
test:
	@mkdir -p .cache && rm -f $(TIMES)
	@for stage in $(STAGES); do \
	  $(PYTHON) tools/stage_times.py run $(TIMES) $$stage -- $(MAKE) --no-print-directory $$stage \
	  || { $(PYTHON) tools/stage_times.py table $(TIMES) $$stage; exit 1; }; done
	@STAGE_TIMES=$(TIMES) $(MAKE) --no-print-directory pytest

## The GitHub workflows (.github/workflows/) are valid: actionlint (without shellcheck, so it checks the same everywhere).
lint: setup
	$(BIN)/actionlint -shellcheck= -pyflakes= .github/workflows/*.yaml

## Exported modules, cleaned notebooks and README.md must already match the notebooks.
sync: setup
	$(BIN)/python tools/check_sync.py

## Every notebook runs top to bottom: NB_WORKERS at a time, with the cores shared out among them (no claim a notebook
## asserts depends on the thread count).
NB_WORKERS ?= $(CORES)
## Without a GPU the Triton kernels run through Triton's interpreter, which must be chosen before any notebook of a
## worker imports triton (torch.compile does): for every notebook, then.
NB_TRITON := $(if $(shell nvidia-smi -L 2>/dev/null),,TRITON_INTERPRET=1)
nbtest: setup
	$(NB_TRITON) OMP_NUM_THREADS=$$(( $(CORES) / $(NB_WORKERS) > 0 ? $(CORES) / $(NB_WORKERS) : 1 )) \
	  $(BIN)/nbdev_test --n_workers $(NB_WORKERS) --timing

## The docs site (Sphinx + MyST-NB over nbdev's processed notebooks) and its check.
docs: setup
	OMP_NUM_THREADS=1 $(BIN)/python tools/build_docs.py
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
latest-env: $(LATEST)/.done
latest: $(LATEST)/.done
	cd tests && $(CURDIR)/$(LATEST)/bin/python -c \
	  "import label_smoothing_fa as m; assert '/site-packages/' in m.__file__, f'not the wheel: {m.__file__}'"
	cd tests && OMP_NUM_THREADS=$(TORCH_THREADS) $(CURDIR)/$(LATEST)/bin/python -m pytest -q -p no:cacheprovider .
$(LATEST)/.done: constraints-latest.txt $(WHEEL)
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip uninstall $(PIP) -y label_smoothing_fa 2>/dev/null || true
	$(LATEST)/bin/pip install $(PIP) -c constraints-latest.txt $(WHEEL) pytest hypothesis scikit-learn torchmetrics relplot accelerate
	$(LATEST)/bin/pip check
	touch $@

## The test suite; with STAGE_TIMES (as `make test` sets it) the stages' wall times come just before its summary line.
## First the GPU command's dry run (a few seconds): the Triton kernel on tiny CPU shapes through Triton's interpreter.
pytest: setup
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_gpu.py --dry-run
	OMP_NUM_THREADS=$(TORCH_THREADS) PYTHONPATH=$(CURDIR)/tools$${PYTHONPATH:+:$$PYTHONPATH} $(BIN)/python -m pytest -p stage_times tests

bench: setup
	$(BIN)/python benchmarks/bench_loss.py
	$(BIN)/python benchmarks/bench_callback.py

## The one prepared GPU command: checks against float64 on the device, the tests marked `cuda`, the timings
## (benchmarks/results/bench_gpu.json). Without a GPU it says so and exits 0.
gpu: setup
	$(BIN)/python benchmarks/bench_gpu.py
