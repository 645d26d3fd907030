# Every target sets up its own environment in .venv (created on first use, refreshed when
# pyproject.toml changes). Python 3.10+ with venv and pip is all a fresh machine needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.14.1 torchvision==0.29.1

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

## Run the main example on the shipped offline demo models (writes PNGs under out/).
example: $(STAMP)
	$(BIN)/python examples/quickstart.py --out out

## Serve the web page on http://127.0.0.1:7860 (offline demo models).
ui: $(STAMP)
	$(BIN)/api-prompt ui

# A second configuration that computes the way other machines do: torch's plain (non-SIMD) kernels,
# MKL and oneDNN held to SSE4, one thread. Float sums then add in another order than on this machine
# (AVX2 or AVX-512, two threads), so a tolerance tighter than the dtype allows fails here too.
OTHER_MACHINE := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 \
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

.PHONY: example ui test test-other-machine lint benchmark clean

## Lint and run the whole test suite twice: as this machine computes, then as another would (what CI runs).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q
	$(MAKE) --no-print-directory test-other-machine

test-other-machine: $(STAMP)
	$(OTHER_MACHINE) $(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
