# make demo: the main job on built-in data.  make test: the test suite.
# Both create .venv from setup.cfg when it is missing or older than the package metadata.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo figures test bench clean-venv

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) train.py --config=configs/demo.py --workdir=workdirs/demo

figures: $(STAMP)
	$(PY) -m dwm_jax.plots --outdir docs/figures

test: $(STAMP)
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/masking.py
	$(PY) benchmarks/data.py --data_dir data

clean-venv:
	rm -rf $(VENV)
