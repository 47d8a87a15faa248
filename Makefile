# Two entry points, both start from nothing: `make demo` and `make test`.
# Everything lives in a local virtual environment ($(VENV)); re-running is cheap
# because the install is stamped against pyproject.toml.
#
# TORCH pins the PyTorch build. The default is the CPU build these machines carry;
# on a GPU cluster pass e.g. TORCH="torch==2.13.0 --index-url https://.../cu128".
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.gptscale-installed

.PHONY: install demo test clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(STAMP)

# The main job: the smallest end-to-end thing gptscale has today (see README).
demo: install
	$(BIN)/gptscale presets
	$(BIN)/gptscale selftest --ranks 2

# The whole suite. pytest's exit code 5 ("no tests collected") is a failure too.
test: install
	@$(BIN)/python -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi; \
	exit $$rc

clean-venv:
	rm -rf $(VENV)
