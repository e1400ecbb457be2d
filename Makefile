# One command to set up and run the example campaign, one to set up and run the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_WHEELS ?= $(or $(PIP_FIND_LINKS),/opt/wheels)
DEMO_DIR ?= demo

.PHONY: venv demo test test-fast faults lint clean cp2k chromium

# uv installs the same requirements as pip in a fraction of the time (measured on 2 cores: 21 s against 2 min 45 s for
# pip). It reads no pip configuration, so pip's configured indexes and constraints are handed on; pip is the fallback.
PIP_CONF = $(shell $(PY) -m pip config list 2>/dev/null | sed -n "s/^global\.$(1)='\(.*\)'$$/\1/p")
UV_INDEXES := $(addprefix --extra-index-url ,$(call PIP_CONF,extra-index-url)) \
              $(addprefix --index-url ,$(call PIP_CONF,index-url) $(PIP_INDEX_URL)) \
              $(addprefix --constraint ,$(call PIP_CONF,constraint) $(PIP_CONSTRAINT))
UV = $(BIN)/uv pip install -q --python $(BIN)/python --find-links $(TORCH_WHEELS) $(UV_INDEXES)

$(BIN)/amdflow: setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned: its CPU wheel lies in PIP_FIND_LINKS; an open range would pull CUDA.
	if $(BIN)/python -m pip install -q uv && $(UV) torch==2.13.0 && $(UV) -e '.[test]'; then :; else \
	  echo "uv failed: installing with pip"; \
	  $(BIN)/python -m pip install -q --upgrade pip && \
	  $(BIN)/python -m pip install -q --find-links $(TORCH_WHEELS) torch==2.13.0 && \
	  $(BIN)/python -m pip install -q -e '.[test]'; fi
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

## cp2k: Debian's CP2K for the CP2K engine's tests (needs root and apt; otherwise those tests skip and say why)
cp2k:
	@if command -v cp2k.psmp >/dev/null 2>&1 || command -v cp2k >/dev/null 2>&1; then echo "cp2k: present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q cp2k >/dev/null || \
	  (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q cp2k >/dev/null) || \
	  echo "cp2k: could not be installed; its tests will skip"; \
	else echo "cp2k: not installed (needs root + apt-get install cp2k); its tests will skip"; fi

## chromium: Debian's headless browser for the HTML-report test (needs root and apt; otherwise that test skips and says why)
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then echo "chromium: present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null || \
	  (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null) || \
	  echo "chromium: could not be installed; the report's browser test will skip"; \
	else echo "chromium: not installed (needs root + apt-get install chromium); the report's browser test will skip"; fi

## test: set up and run the whole test suite (slow tier included)
test: venv cp2k chromium
	$(BIN)/python -m pytest -n 2 -q --durations=15

test-fast: venv
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

## faults: the fault tests (kill -9 of each kind of rocket, database restart, a Firework that always fails) FAULT_RUNS times in a row
FAULT_RUNS ?= 3
faults: venv
	$(BIN)/python scripts/repeat_faults.py --runs $(FAULT_RUNS)

lint: venv
	$(BIN)/ruff check amdflow tests scripts

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info
