# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU torch from the local wheel cache; override (e.g. TORCH='torch==2.14.1') on a GPU box.
TORCH ?= torch==2.13.0
DEMO_DIR ?= data/demo
MODEL_DIR ?= data/tiny-internvl
PYTEST_ARGS ?=

.PHONY: setup demo demo-eval test test-fast lint format clean

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
