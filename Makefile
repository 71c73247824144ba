# Two entry points after cloning:
#   make run   - set up .venv, build the extension, train SimCLR on digits, print the loss benchmark table
#   make test  - set up .venv, build the extension, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU build of torch on a machine without a CUDA torch; never pull a multi-GB CUDA wheel.
TORCH_SPEC ?= torch==2.13.*
# Triton's interpreter runs the Triton kernels on CPU tensors for the tests.
export TRITON_INTERPRET ?= 1

.PHONY: venv build test run clean

$(VENV)/.deps: requirements-dev.txt
	@if $(PYTHON) -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
		echo "reusing the CUDA-enabled torch of $(PYTHON) (venv with system site-packages)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
		$(PIP) install -q --upgrade pip setuptools wheel; \
	else \
		$(PYTHON) -m venv $(VENV); \
		$(PIP) install -q --upgrade pip setuptools wheel; \
		$(PIP) install -q "$(TORCH_SPEC)"; \
	fi
	$(PIP) install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.deps

build: venv
	$(PIP) install -q --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest -q tests

run: build
	$(PY) -m cl_fast train simclr --out runs/simclr
	$(PY) -m cl_fast bench

clean:
	rm -rf build *.egg-info cl_fast/*.so
