# Two commands for a fresh machine (Python 3.11, no GPU):
#   make demo   install into .venv, prepare the embedded demo model, stream one answer
#   make test   install into .venv, run the whole test suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DEMO := weights/smollm2-135m-instruct

.PHONY: demo test bench serve clean
demo: $(VENV)/.installed $(DEMO)/config.json
	$(PY) -m llama_pkg predict --weights $(DEMO) -i prompt="What is the capital of France? Answer in one sentence." -i temperature=0

test: $(VENV)/.installed $(DEMO)/config.json
	$(PY) -m pytest -q

bench: $(VENV)/.installed $(DEMO)/config.json
	PYTHONPATH=. $(PY) scripts/bench_engine.py
	PYTHONPATH=. $(PY) scripts/bench_batch.py

serve: $(VENV)/.installed $(DEMO)/config.json
	$(PY) -m llama_pkg serve --weights $(DEMO)

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(DEMO)/config.json: scripts/make_demo_model.py | $(VENV)/.installed
	$(PY) scripts/make_demo_model.py $(DEMO)

clean:
	rm -rf $(VENV) $(DEMO) .cog
