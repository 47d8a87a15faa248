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

# The main job: tokenizer + shards from the embedded corpus, then ZeRO-3 pretraining of the
# tiny preset on 2 CPU ranks, a sample from the checkpoint and the loss plot (see README).
RUN := runs/tiny
demo: install
	$(BIN)/gptscale data train-tokenizer --input builtin:python --vocab-size 4096 --out runs/tokenizer
	$(BIN)/gptscale data prepare --input builtin:python --tokenizer runs/tokenizer --out runs/data \
		--shard-size 1MB --val-fraction 0.02 --overwrite
	rm -rf $(RUN)
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node 2 -m gptscale.cli train \
		--config configs/tiny.yaml --set train.out_dir=$(RUN)
	$(BIN)/gptscale generate --checkpoint $(RUN)/checkpoints/step00000300 --prompt "def " --max-new-tokens 60
	$(BIN)/gptscale plot $(RUN)
	$(BIN)/gptscale convert to-hf $(RUN)/checkpoints/step00000300 $(RUN)/hf --quiet

# The whole suite. pytest's exit code 5 ("no tests collected") is a failure too.
test: install
	@$(BIN)/python -m pytest -q --durations=15 tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi; \
	exit $$rc

clean-venv:
	rm -rf $(VENV)
