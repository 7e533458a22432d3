# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU torch from the local wheel cache; override (e.g. TORCH='torch==2.14.1') on a GPU box.
TORCH ?= torch==2.13.0
DEMO_DIR ?= data/demo
MODEL_DIR ?= data/tiny-internvl
PYTEST_ARGS ?=

.PHONY: setup demo demo-eval demo-iterative test test-fast lint format clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) scripts/make_demo.py --model-dir $(MODEL_DIR) --data-dir $(DEMO_DIR)
	$(PY) train/train_mpo.py --config configs/demo.yaml
	$(PY) -m mpo.cli report runs/demo
	$(PY) -m mpo.cli summary runs/demo

# The demo with a multiple-choice benchmark (built from the held-out images) asked at steps 0, 200,
# 400 and 600: accuracy and repetition numbers in metrics.jsonl and the report. The questions use the
# demo's own wording, which is all the tiny model knows, so no answer instruction is appended.
demo-eval: setup
	$(PY) scripts/make_demo.py --model-dir $(MODEL_DIR) --data-dir $(DEMO_DIR)
	$(PY) train/train_mpo.py --config configs/demo.yaml training.output_dir=runs/demo-eval \
		"training.eval_benchmarks=[$(DEMO_DIR)/shapes.tsv]" training.eval_benchmark_steps=200 \
		training.eval_benchmark_max_new_tokens=12 training.eval_benchmark_batch_size=16 \
		training.eval_benchmark_mc_prompt=
	$(PY) -m mpo.cli report runs/demo-eval
	$(PY) -m mpo.cli summary runs/demo-eval

# Iterative MPO on the demo: a short round on the demo pairs; the model answers the training prompts
# 8 times each; pairs are built by correctness against the known colours; a second round trains on
# those pairs only. Held-out benchmark accuracy is printed after each round.
ITER_STEPS ?= 150
ITER_DIR ?= runs/iterative
ITER_EVAL = $(PY) -m mpo.cli eval --benchmark $(DEMO_DIR)/shapes.tsv --mc-prompt= --max-new-tokens 12 \
	--batch-size 16 --max-dynamic-patch 4
demo-iterative: setup
	rm -rf $(ITER_DIR)  # samples resume by prompt: a new round-1 model needs a fresh folder
	$(PY) scripts/make_demo.py --model-dir $(MODEL_DIR) --data-dir $(DEMO_DIR)
	$(PY) train/train_mpo.py --config configs/demo.yaml training.output_dir=$(ITER_DIR)/round1 \
		training.max_steps=$(ITER_STEPS) training.save_steps=$(ITER_STEPS) training.sample_steps=0
	@echo "== round 1: held-out accuracy"
	$(ITER_EVAL) --model $(ITER_DIR)/round1/final
	$(PY) -m mpo.cli pairs sample --config configs/demo.yaml model.path=$(ITER_DIR)/round1/final \
		--prompts $(DEMO_DIR)/train.jsonl --out $(ITER_DIR)/samples --num-samples 8 --max-new-tokens 12 \
		--batch-size 16 --temperature 1.0
	$(PY) -m mpo.cli pairs build --correctness --samples $(ITER_DIR)/samples --out $(ITER_DIR)/pairs
	$(PY) train/train_mpo.py --config configs/demo.yaml training.output_dir=$(ITER_DIR)/round2 \
		model.path=$(ITER_DIR)/round1/final data.meta_path=$(ITER_DIR)/pairs/meta.json \
		training.max_steps=$(ITER_STEPS) training.save_steps=$(ITER_STEPS) training.sample_steps=0
	@echo "== round 2: held-out accuracy (round 1 above)"
	$(ITER_EVAL) --model $(ITER_DIR)/round2/final

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check mpo train scripts tests
	$(PY) -m ruff format --check mpo train scripts tests

format: setup
	$(PY) -m ruff format mpo train scripts tests

clean:
	rm -rf runs $(DEMO_DIR) $(MODEL_DIR)
