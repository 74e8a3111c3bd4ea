# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# pip's notes about local index folders it skips are noise; real errors still fail the pipe
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: setup demo test bench bench-validity bench-gpu lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: it comes from this machine's disk and must not be resolved by pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install -q -e ".[dev]" 2>&1 | $(QUIET_PIP)
	$(PY) -c "import torch, torchvision, ray, webdataset, cv2, counterfactory"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/counterfactory run configs/demo.yaml
	@echo "image demo: outputs/demo/$$(cat outputs/demo/latest) (card: README.md there; viewer: counterfactory card demo --html)"
	$(VENV)/bin/counterfactory run configs/demo_video.yaml
	@echo "video demo: outputs/demo_video/$$(cat outputs/demo_video/latest) (mp4 pairs, per-frame masks)"

# The viewer test drives a real headless Chromium: install Debian's chromium and
# chromium-driver when missing (non-interactive; as root, or with passwordless sudo).
# If that is impossible the viewer test skips with the reason; everything else still runs.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo "sudo -n")
test: setup
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  echo "installing chromium and chromium-driver (apt-get) for the viewer test"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	    chromium chromium-driver || echo "warning: could not install chromium; the viewer test will skip"; \
	fi
	# the module layers and no import circles (pyproject.toml [tool.importlinter]): a new circle fails CI
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/run.py

# Data validity (issue 16): procedural scenes with object-free renders + the demo photos, per
# variant: pass rate, pixels/answers vs truth, fill texture ratio, flat-patch detection, controls
bench-validity: setup
	$(PY) bench/validity.py

# GPU throughput: every model stage beside its raw library call, end to end at 20 and 4 steps,
# one table (full-size random-weight models, nothing downloaded; < 8 min on one H100/H200).
# On a machine without a GPU: `make bench-gpu BENCH_GPU_ARGS="--device cpu"` (host overhead).
BENCH_GPU_ARGS ?=
bench-gpu: setup
	$(PY) bench/bench_gpu.py --out bench/gpu.json --table bench/gpu.md $(BENCH_GPU_ARGS)

lint: setup
	$(VENV)/bin/ruff check counterfactory tests bench

clean:
	rm -rf outputs build .pytest_cache
