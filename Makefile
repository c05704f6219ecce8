# Two commands for a fresh machine (Python 3.11 or newer, no GPU):
#   make demo   install into .venv, prepare the embedded demo model, stream one answer
#   make test   install into .venv, run the whole test suite
# The first Python >= 3.11 found among these names builds .venv (CI and the tests run 3.11);
# `make PYTHON=/path/to/python3.x ...` picks one.
PYTHON ?= $(shell for p in python3.11 python3.12 python3.13 python3.14 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { echo $$p; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
DEMO := weights/smollm2-135m-instruct

.PHONY: demo test bench serve clean
demo: $(VENV)/.installed $(DEMO)/config.json
	$(PY) -m llama_pkg predict --weights $(DEMO) -i prompt="What is the capital of France? Answer in one sentence." -i temperature=0

test: $(VENV)/.installed $(DEMO)/config.json
	$(PY) -m pytest -q

bench: $(VENV)/.installed $(DEMO)/config.json
	$(PY) scripts/bench_engine.py
	$(PY) scripts/bench_batch.py
	$(PY) scripts/bench_http.py

PORT ?= 5000
serve: $(VENV)/.installed $(DEMO)/config.json
	$(PY) -m llama_pkg serve --weights $(DEMO) --port $(PORT)

$(VENV)/.installed: requirements.txt pyproject.toml
	@test -x $(PY) || test -n "$(PYTHON)" || { echo "error: no Python 3.11 or newer found (tried python3.11 to python3.14 and python3); install one, or run make PYTHON=/path/to/python3.11" >&2; exit 1; }
	@# the interpreter that will build or already built .venv must be 3.11 or newer: checked before .venv exists
	@py=$$(test -x $(PY) && echo $(PY) || echo "$(PYTHON)"); \
	$$py -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	echo "error: $$py is Python $$($$py -c 'import sys; print(*sys.version_info[:2], sep=".")' 2>/dev/null || echo '(not runnable)'); 3.11 or newer is needed (make PYTHON=/path/to/python3.11$$(test -x $(PY) && echo ', after make clean'))" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

$(DEMO)/config.json: scripts/make_demo_model.py | $(VENV)/.installed
	$(PY) scripts/make_demo_model.py $(DEMO)

clean:
	rm -rf $(VENV) $(DEMO) .cog
