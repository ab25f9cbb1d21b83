# One entry point for set-up, tests, the demo and the benchmarks. The virtual environment lives in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := demo-output

.PHONY: setup test demo bench clean

setup: $(STAMP)

# torch first, pinned: an unpinned torch (or a package that pulls one) downloads CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[i2p,nudenet,app,test,dev]"
	bash scripts/install-browser.sh   # Debian chromium for the demo's browser test
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m safe_diffusion.testing $(DEMO)/checkpoint --size small
	$(PY) -m safe_diffusion generate "a lighthouse on a cliff at dusk" --model $(DEMO)/checkpoint \
		--out $(DEMO)/generate --safety strong --compare --num-images 2 --steps 25
	@echo "Demo output: $(DEMO)/generate (guided, unguided and side-by-side PNGs with JSON sidecars)"

bench: setup
	$(PY) benchmarks/bench_sld.py

clean:
	rm -rf $(DEMO) .pytest_cache
