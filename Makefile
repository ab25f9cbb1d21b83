# One entry point for set-up, tests, the demo and the benchmarks. The virtual environment lives in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := demo-output

.PHONY: setup test test-quick lint demo bench bench-realsize clean

setup: $(STAMP)

# torch first, pinned: an unpinned torch (or a package that pulls one) downloads CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[eval,nudenet,app,quality,train,test,dev]"
	# FID's InceptionV3; --no-deps because it declares torchvision, which would pull another torch (docs/quality.md)
	$(PY) -m pip install -q --no-deps torch-fidelity==0.4.0
	bash scripts/install-browser.sh   # Debian chromium for the demo's browser test
	touch $(STAMP)

# CI's command: lint, the suite with this CPU's kernels, then the portability guard (CONTRIBUTING.md): the suite
# again under the portable and the AVX2 kernels, one thread and another MKL code path.
test: setup lint
	$(PY) -m pytest -q
	bash scripts/portability-guard.sh $(PY)

# One pass, for working on the code; CI runs `make test`.
test-quick: setup
	$(PY) -m pytest -q

# The rule set is in pyproject.toml ([tool.ruff.lint]); the formatter keeps the line length (`ruff format` fixes).
lint: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

# I2P prompts are inappropriate by design: demo-output/ is git-ignored and must never be committed.
I2P_SAMPLE := --limit 6 --images-per-prompt 2 --steps 10 --height 64 --width 64 --batch-size 4 \
	--classifiers q16,nudenet --q16-model $(DEMO)/clip

demo: setup
	$(PY) -m safe_diffusion.testing $(DEMO)/checkpoint --size small
	$(PY) -m safe_diffusion generate "a lighthouse on a cliff at dusk" --model $(DEMO)/checkpoint \
		--out $(DEMO)/generate --safety strong --compare --num-images 2 --steps 25
	$(PY) -m safe_diffusion.testing clip $(DEMO)/clip
	$(PY) -m safe_diffusion i2p run --model $(DEMO)/checkpoint --out $(DEMO)/i2p-off --safety off $(I2P_SAMPLE)
	$(PY) -m safe_diffusion i2p run --model $(DEMO)/checkpoint --out $(DEMO)/i2p-strong --safety strong $(I2P_SAMPLE)
	$(PY) -m safe_diffusion i2p score $(DEMO)/i2p-strong --json $(DEMO)/i2p-strong-results.json
	$(PY) -m safe_diffusion i2p report $(DEMO)/i2p-off $(DEMO)/i2p-strong --out $(DEMO)/i2p-report.html
	@echo
	@echo "Demo output in $(DEMO)/:"
	@echo "  generate/          guided, unguided and side-by-side PNGs with JSON sidecars"
	@echo "  i2p-off/, i2p-strong/  two resumable I2P runs (6 prompts x 2 images, random weights)"
	@echo "  i2p-report.html    the paper's table for both runs, a bar chart, blurred samples (+ .md)"

bench: setup
	$(PY) benchmarks/bench_sld.py

# Real-size random-weight models (issue 23). DEVICE=cuda: every family, 336 s measured on one H200;
# DEVICE=cpu: SD 1.5 only, 2 steps, about 8 minutes on 2 idle cores. Results in benchmarks/results/.
DEVICE ?= cpu
bench-realsize: setup
	$(PY) benchmarks/realsize.py --device $(DEVICE) --json benchmarks/results/realsize-$(DEVICE).json

clean:
	rm -rf $(DEMO) .pytest_cache
