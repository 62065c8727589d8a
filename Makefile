# minidetr: two commands do everything on a fresh machine.
#   make demo   -- the main job (trains on the built-in data, CPU, no downloads)
#   make test   -- the whole test suite
# Both create/update a local virtual environment in .venv on first use.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test venv bench notebooks clean help

help:
	@echo "make demo   - run the main job (training demo)"
	@echo "make test   - run the whole test suite"
	@echo "make bench  - run the deformable-attention benchmark"
	@echo "make notebooks - re-execute every notebook (notebooks/*.py -> .ipynb with outputs)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,notebooks]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m minidetr demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup

bench: $(STAMP)
	$(PY) -m minidetr bench msda

notebooks: $(STAMP)
	$(PY) -m minidetr.lessons.notebooks build

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
