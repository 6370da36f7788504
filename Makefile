# The two set-up commands from the README: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
DEB_VERSION ?=
DEB_OUT ?= dist

.PHONY: install demo test test-compiled lint unit fuzz bench pyz deb clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# A venv made before the rename holds the old "meshd" distribution: remove it (never install that name).
	$(VENV)/bin/pip uninstall --quiet --yes meshd 2>/dev/null || true
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

demo: install
	bash scripts/demo.sh

lint: install
	$(VENV)/bin/ruff check meshd tests bench fuzz scripts
	$(VENV)/bin/ruff format --check meshd tests bench fuzz scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Two steps, so a failure shows early: the fast suite (everything not marked slow), then the slow one
# (the .deb under systemd, the pyz, network namespaces, the soak, long transfers); then the fast
# suite again on the compiled core.
test: lint
	$(PY) -m pytest $(PYTEST_ARGS) -m "not slow"
	$(PY) -m pytest $(PYTEST_ARGS) -m slow
	$(MAKE) test-compiled

# The same suite (less the slow tests) against the compiled core: scripts/compile_core.py on a copy of the
# tree under build/compiled, so the .so files never shadow the sources you edit. On a machine that cannot
# compile it says why and the copy stays pure; MESHD_EXPECT_COMPILED=1 makes tests/test_build.py fail then.
COMPILED := build/compiled
test-compiled: install
	rm -rf $(COMPILED) && mkdir -p $(COMPILED)
	cp -r meshd $(COMPILED)/
	$(PY) scripts/compile_core.py $(COMPILED)  # as the .deb build does it: the package alone, no pyproject
	cp -rp tests fuzz bench configs examples scripts systemd packaging docs pyproject.toml README.md Makefile $(COMPILED)/
	ln -s $(abspath $(VENV)) $(COMPILED)/.venv  # for the scripts the tests run (make demo's)
	cd $(COMPILED) && MESHD_EXPECT_COMPILED=1 PYTHONPATH=$$PWD $(abspath $(PY)) -m pytest $(PYTEST_ARGS) -m "not slow" -p no:cacheprovider

# Long-budget fuzzing of every parser and sans-I/O core: FUZZ_SECONDS=300 make fuzz (FUZZ_ENGINE=atheris
# for coverage-guided runs, if atheris installs). CI runs the same targets bounded in tests/reliability/.
FUZZ_SECONDS ?= 60
fuzz: install
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(PY) -m fuzz.run

bench: install
	$(PY) bench/l4.py
	$(PY) bench/l7.py

# Soak: mixed L4 + L7 traffic with churn; fails if RSS, fds or tasks grow without bound (bench/README.md).
# Writes bench/results/soak-<stamp>.{json,png} and build/soak.json for scripts/reliability_report.py.
SOAK_MINUTES ?= 2
.PHONY: soak
soak: install
	$(PY) bench/soak.py --minutes $(SOAK_MINUTES)

# One file that runs meshd on a Linux host with Python >= 3.11 and nothing else installed.
pyz: install
	mkdir -p dist
	$(VENV)/bin/shiv --compressed -c meshd -p '/usr/bin/env python3' -o dist/meshd.pyz .

# The Debian package: dist/meshd_<version>_<arch>.deb, self-contained (docs/install.md). Network only here,
# at build time (the wheels); installing it needs none. DEB_VERSION=... to number a rebuild.
deb: install
	DEB_VERSION=$(DEB_VERSION) DEB_OUT=$(DEB_OUT) scripts/build-deb.sh

clean:
	rm -rf $(VENV) demo-state build .pytest_cache .mypy_cache .ruff_cache
