# Two entry points: `make demo` (the main job end to end) and `make test` (lint + the whole test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA := data_cache
RUN := runs/demo

.PHONY: demo test lint venv bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Tokenizer -> token shards -> train the default MoE -> validation perplexity -> generated text.
demo: venv
	@test -f $(DATA)/tokenizer.model || $(BIN)/sparselm tokenizer train --out $(DATA)/tokenizer --vocab-size 8192
	@test -f $(DATA)/default/meta.json || $(BIN)/sparselm prepare --tokenizer $(DATA)/tokenizer.model --out $(DATA)/default
	rm -rf $(RUN)
	$(BIN)/sparselm train --config configs/default.toml --out $(RUN)
	$(BIN)/sparselm ppl --ckpt $(RUN) --input $(DATA)/default --split val
	$(BIN)/sparselm generate --ckpt $(RUN) --prompt "It was a dark and stormy night" --prompt "The old man said" --max-new-tokens 48

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: lint
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/moe_layer.py --write-docs
	$(BIN)/python benchmarks/ops.py --write-docs
	$(BIN)/python benchmarks/train.py --write-docs
	$(BIN)/python benchmarks/zero_memory.py --write-docs
	$(BIN)/python benchmarks/comm_volume.py --write-docs
	$(BIN)/python benchmarks/step_time.py --write-docs
	$(BIN)/python benchmarks/paged_attention.py --write-docs
	$(BIN)/python benchmarks/causal_attention.py --write-docs
	$(BIN)/python benchmarks/row_matmul.py --write-docs
	@test -f $(DATA)/tokenizer.model || $(BIN)/sparselm tokenizer train --out $(DATA)/tokenizer --vocab-size 8192
	$(BIN)/python benchmarks/data_pipeline.py --write-docs

clean:
	rm -rf $(DATA) runs
