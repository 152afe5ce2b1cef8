# The two commands a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=
# A software TPM and the TSS library the real TPM source builds against (tests use swtpm), and
# the Prometheus server the metrics test scrapes the mesh with.
SYSTEM_PACKAGES := swtpm swtpm-tools libtss2-dev libtss2-tcti-swtpm0 pkg-config prometheus

.PHONY: run test lint bench install clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "attestmesh needs Python 3.11 or newer ($(PYTHON))"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# System packages come from the distribution when we may install them (root + apt-get);
# elsewhere the software-TPM test says what is missing and skips.
$(VENV)/.system: | $(BIN)/python
	@if command -v swtpm >/dev/null 2>&1 && pkg-config --exists tss2-esys 2>/dev/null \
		&& command -v prometheus >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing $(SYSTEM_PACKAGES)"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; } \
		|| echo "warning: could not install $(SYSTEM_PACKAGES); the swtpm and Prometheus tests will skip"; \
	else echo "note: $(SYSTEM_PACKAGES) not installed (needs root and apt-get)"; fi
	@touch $@

$(STAMP): pyproject.toml | $(BIN)/python $(VENV)/.system
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,tpm]' \
		|| echo "warning: tpm2-pytss did not build; the real TPM source stays unavailable"
	@touch $@

install: $(STAMP)

run: install
	$(BIN)/attestmesh up $(ARGS)

lint: install
	$(BIN)/ruff check services tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q --durations=15

bench: install
	$(BIN)/attestmesh bench $(ARGS)

clean:
	rm -rf $(VENV) .attestmesh .pytest_cache .mypy_cache .ruff_cache
