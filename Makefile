# The README's two commands. Each installs what it needs (PyTorch as the CPU 2.13.0 build) first, into a
# virtualenv in .venv that the first run creates (a system Python is often "externally managed" and refuses
# pip). PY=/path/to/python uses that interpreter instead, and creates nothing.
VENV_PY := .venv/bin/python
PY ?= $(VENV_PY)
PIP = $(PY) -m pip install -q --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: install install-test demo test test-fast docs lint
install: $(filter $(VENV_PY),$(PY))
	$(PIP) torch==2.13.0
	$(PIP) -e ".[export]"

$(VENV_PY):
	python3 -m venv .venv

# the tests also need the TensorRT modules PyPI has (trt-api: the lean runtime and TensorRT for RTX), the
# server and its Ray Serve deployment (serve, ray), the OpenVINO backend (openvino),
# open_clip, the tokenizer tests' independent reference (--no-deps: its torchvision dependency is not needed),
# and the patched TensorRT type stubs in .stubs/ (the tests never download: without them, those skip)
install-test: install
	$(PIP) -e ".[export,test,trt-api,serve,ray,openvino,control]"
	$(PIP) --no-deps open_clip_torch==3.3.0
	$(PY) tests/typecheck/patch_trt_stubs.py

demo: install
	$(PY) -m sdrt demo

# pytest exits 5 when it collects no test; that is not a failure of the build. JOBS test processes
# (pytest-xdist; default 2, this machine's cores): each module on one of them, the heavy tests all on one
# (tests/conftest.py), the session's exports made once and shared. JOBS=0 runs everything in this process.
JOBS ?= 2
test: install-test
	$(PY) -m pytest -n $(JOBS) --dist loadgroup $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

# the documentation site, built in strict mode (a broken link or reference fails) into site/ (git-ignored)
docs: $(filter $(VENV_PY),$(PY))
	$(PIP) -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -d site

# the inner loop, after one `make install-test`: every test but the slow tier (full-size models, the Ray
# cluster, the browser), in JOBS processes as `make test`; installs nothing. `make test` (CI) still runs everything.
FAST_TIER = not slow and not ray and not browser
test-fast: $(filter $(VENV_PY),$(PY))
	$(PY) -m pytest -p no:cacheprovider -n $(JOBS) --dist loadgroup -m "$(FAST_TIER)" $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

lint: $(filter $(VENV_PY),$(PY))
	$(PY) -m ruff check sdrt export runtime benchmarks engines quality serve tests
