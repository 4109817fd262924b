# The README's quick start on CPU:
#   make demo   install, then train on a real pretrained model offline and answer a prompt (CPU is enough)
#   make demo-preference   after make demo: DPO from the demo's adapter on oasst1's rankings; base / SFT / DPO report
#   make test   install, then lint and run the test suite (installs Chromium for the browser test when root)
#
# Everything installs into .venv. TORCH picks the torch build: the default is the CPU build that the tests need; on a
# GPU machine use e.g. `make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.

VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo demo-preference demo-page test lint install chromium clean gpu-wheels gpu-check gpu-rehearsal

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) demo.py

# After `make demo`: DPO from its adapter (model/) on the sample's ranked replies, into model-dpo/
# (docs/preference-tuning.md).
demo-preference: install
	$(PY) demo.py --preference

# After `make demo`: the chat page's Compare tab, in headless Chromium, on the demo's held-out questions.
demo-page: install chromium
	$(PY) -m pytest tests/demo_page_check.py

lint: install
	$(VENV)/bin/ruff check .

test: lint chromium
	$(PY) -m pytest

# The browser test (tests/test_browser.py) drives Debian's Chromium through Playwright; Playwright's own browser
# download is not used. Installed here when missing and running as root (as CI does); otherwise say what to do.
chromium:
	@if [ -z "$$CHROMIUM" ] && ! command -v chromium >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
		else \
			echo "The browser test needs Chromium: sudo apt-get install chromium (or set CHROMIUM=/path/to/it)."; \
		fi; \
	fi

# The GPU check (bench/README.md). gpu-wheels, on a machine with network: the wheels and tokenizer that a GPU machine
# without network lacks, into .whl/ (their versions checked; fails above 64 MiB). gpu-check, on the GPU machine, with
# the repository and .whl/ copied there (no venv needed). gpu-rehearsal: the same steps at tiny size on CPU.
gpu-wheels: install
	$(PY) bench/gpu_wheels.py

gpu-check:
	bash bench/gpu_check.sh

gpu-rehearsal: install
	PYTHON=$(PY) bash bench/gpu_check.sh --rehearsal

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
