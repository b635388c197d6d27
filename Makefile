# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fixative info toy
	$(BIN)/fixative generate --model toy --prompt "a painting of a house by kovra" --seed 0 --steps 25 \
		--guidance 5 --scheduler ddim --num-images 4 --out outputs/demo
	@echo "wrote outputs/demo/image-00{0..3}.png (toy world, 25 DDIM steps)."
	@echo "coming next: cloak (GLAZE-style cloaking), consistency (one-step distillation), eval (FID, CLIP score, protection rates)."

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/core_networks.py
	$(BIN)/python benchmarks/pipeline.py --quick
	$(BIN)/python benchmarks/finetune.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
