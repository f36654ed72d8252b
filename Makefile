# The README's two commands. Each installs what it needs (PyTorch as the CPU 2.13.0 build) first.
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: install demo test lint
install:
	$(PIP) torch==2.13.0
	$(PIP) -e ".[export,test]"
	# the tokenizer tests' independent reference; --no-deps: its torchvision dependency is not needed
	$(PIP) --no-deps open_clip_torch==3.3.0

demo: install
	sdrt demo

# pytest exits 5 when it collects no test; that is not a failure of the build
test: install
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

lint:
	$(PY) -m ruff check sdrt export runtime benchmarks engines tests
