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

.PHONY: install demo finetune-demo sweep-demo beyond-memory test docker-check clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(STAMP)

# The main job: tokenizer + shards from the embedded corpus, then ZeRO-3 pretraining of the
# tiny preset on 2 CPU ranks (1,000 steps), a sample from the checkpoint and the loss plot (see README).
# Validation: 1% of every document's 256-token chunks, so it has the training mix (see README).
RUN := runs/tiny
demo: install
	$(BIN)/gptscale data train-tokenizer --input builtin:python --vocab-size 4096 --out runs/tokenizer
	$(BIN)/gptscale data prepare --input builtin:python --tokenizer runs/tokenizer --out runs/data \
		--shard-size 1MB --val-fraction 0.01 --val-chunk 256 --overwrite
	rm -rf $(RUN)
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node 2 -m gptscale.cli train \
		--config configs/tiny.yaml --set train.out_dir=$(RUN)
	$(BIN)/gptscale generate --checkpoint $(RUN)/checkpoints/step00001000 --prompt "def" --max-new-tokens 60
	$(BIN)/gptscale plot $(RUN)
	$(BIN)/gptscale convert to-hf $(RUN)/checkpoints/step00001000 $(RUN)/hf --quiet

# Fine-tuning the demo's model (runs `make demo` first if its checkpoint is missing): records of
# "what does this line define?" (class / method / function), LoRA on 2 CPU ranks with the
# exact match of held-out answers before and after, a chat with the adapters, and the adapters
# exported as a PEFT folder beside the exported base (see README, "Fine-tune").
FT := runs/sft-lora
finetune-demo: install
	test -d $(RUN)/checkpoints/step00001000 || $(MAKE) demo
	$(BIN)/python examples/sft_records.py runs/sft_records
	$(BIN)/gptscale data prepare-sft --input runs/sft_records/train.jsonl --val-input runs/sft_records/val.jsonl \
		--tokenizer runs/tokenizer --out runs/sft_data --seq-len 64 --overwrite
	rm -rf $(FT)
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node 2 -m gptscale.cli finetune \
		--config configs/sft-lora.yaml --set train.out_dir=$(FT)
	$(BIN)/gptscale generate --checkpoint $(RUN)/checkpoints/step00001000 --adapter $(FT)/checkpoints/step00000200 \
		--chat --prompt "def read_config(self, path):" --temperature 0
	rm -rf $(FT)/peft
	$(BIN)/gptscale convert to-hf --adapter $(FT)/checkpoints/step00000200 $(FT)/peft --base $(RUN)/hf

# A scaling-law sweep on the demo's data (made first if missing): 4 model sizes x 3 token budgets,
# each a normal 2-rank training run (skipped once done), then the fit of L(N, D) with bootstrap
# intervals, the compute-optimal N and D, sweep.json and three PNGs in runs/sweep-tiny (see README).
sweep-demo: install
	test -f runs/tokenizer/tokenizer.json || $(BIN)/gptscale data train-tokenizer --input builtin:python \
		--vocab-size 4096 --out runs/tokenizer
	test -f runs/data/manifest.json || $(BIN)/gptscale data prepare --input builtin:python --tokenizer runs/tokenizer \
		--out runs/data --shard-size 1MB --val-fraction 0.01 --val-chunk 256 --overwrite
	OMP_NUM_THREADS=1 $(BIN)/gptscale sweep --config configs/sweep-tiny.yaml

# ZeRO-Infinity past this machine's RAM (bench/beyond_memory.py, see its docstring): a 1.8B-parameter
# model whose training state is swapped to NVMe in NVME_DIR (~33 GB there, deleted afterwards;
# refused if that would leave under 13 GB free), 3 optimizer steps on 2 CPU ranks, ~6 minutes.
# DeepSpeed's async_io op needs libaio's headers: installed here when missing and run as root.
NVME_DIR ?= /var/tmp
beyond-memory: install
	@test -e /usr/include/libaio.h || { test "$$(id -u)" = 0 && apt-get -qq install -y --no-install-recommends libaio-dev; } \
		|| { echo "beyond-memory: install libaio-dev (DeepSpeed's async_io op compiles against it)" >&2; exit 2; }
	nice -n 10 $(BIN)/python bench/beyond_memory.py --nvme-dir $(NVME_DIR) --json runs/beyond_memory.json

# The whole suite. pytest's exit code 5 ("no tests collected") is a failure too.
test: install
	@$(BIN)/python -m pytest -q --durations=15 tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi; \
	exit $$rc

# Both Docker images built and run on this machine, no image registry needed (docker/check.sh: a private
# dockerd if none is reachable, a debootstrap base, a wheelhouse from this machine's pip, the CPU image's
# selftest, unit tests and 20 training steps, the GPU image's layers with CUDA=0). Needs no venv; run as
# root; cleans up after itself (KEEP=1 keeps the images and the daemon). Run it whenever docker/ changes.
docker-check:
	TORCH="$(TORCH)" PYTHON="$(PYTHON)" docker/check.sh

clean-venv:
	rm -rf $(VENV)
