# The README's two commands. Each installs what it needs (PyTorch as the CPU 2.13.0 build) first.
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: install install-test demo test lint
install:
	$(PIP) torch==2.13.0
	$(PIP) -e ".[export]"

# the tests also need the TensorRT modules PyPI has (trt-api: the lean runtime and TensorRT for RTX) and
# open_clip, the tokenizer tests' independent reference (--no-deps: its torchvision dependency is not needed)
install-test: install
	$(PIP) -e ".[export,test,trt-api]"
	$(PIP) --no-deps open_clip_torch==3.3.0

demo: install
	sdrt demo

# pytest exits 5 when it collects no test; that is not a failure of the build
test: install-test
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

lint:
	$(PY) -m ruff check sdrt export runtime benchmarks engines tests
