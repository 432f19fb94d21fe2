# The README's two commands: `make demo` (set up + run the main job) and `make test` (set up + tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch's CPU wheel on this project's machines cannot import torchvision (only CUDA builds exist);
# the CUDA build of torch runs fine on CPU, so ask for it explicitly.
TORCH_PINS := "torch==2.13.0,!=2.13.0+cpu" "torchvision==0.28.0"

.PHONY: setup demo test test-slow clean

$(BIN)/mpdeploy: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e ".[dev,serve,sweep]"
	touch $(BIN)/mpdeploy

setup: $(BIN)/mpdeploy

demo: setup
	$(BIN)/mpdeploy build --sparse

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV)
