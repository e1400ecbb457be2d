# One command to set up and run the example campaign, one to set up and run the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_WHEELS ?= $(or $(PIP_FIND_LINKS),/opt/wheels)
DEMO_DIR ?= demo

.PHONY: venv demo test test-fast lint clean

$(BIN)/amdflow: setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: its CPU wheel lies in PIP_FIND_LINKS; an open range would pull CUDA.
	$(BIN)/python -m pip install -q --find-links $(TORCH_WHEELS) torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/amdflow

## demo: set up and run the example campaign (Ce-Fe-In) end to end on the embedded store
demo: venv
	rm -rf $(DEMO_DIR)
	$(BIN)/amdflow init $(DEMO_DIR)/campaign.yaml
	$(BIN)/amdflow add $(DEMO_DIR)/campaign.yaml
	$(BIN)/amdflow run $(DEMO_DIR)/campaign.yaml
	$(BIN)/amdflow status $(DEMO_DIR)/campaign.yaml
	$(BIN)/amdflow report $(DEMO_DIR)/campaign.yaml

## test: set up and run the whole test suite (slow tier included)
test: venv
	$(BIN)/python -m pytest -n 2 -q

test-fast: venv
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

lint: venv
	$(BIN)/ruff check amdflow tests scripts

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info
