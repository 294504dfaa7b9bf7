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

# The .pth tests of the converter need PyTorch: installed from this machine's disk when a
# CPU build lies there (pip's find-links); elsewhere they are skipped, saying so.
TORCH_STAMP := $(VENV)/.torch
$(TORCH_STAMP): $(STAMP)
	if $(PY) -m pip install -q --no-deps --no-index torch==2.13.0 >/dev/null 2>&1; \
	    then $(PY) -m pip install -q torch==2.13.0; \
	else echo "no local PyTorch CPU wheel: the .pth converter tests will be skipped"; fi
	touch $(TORCH_STAMP)

test: $(STAMP) $(TORCH_STAMP)
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/masking.py
	$(PY) benchmarks/data.py --data_dir data

clean-venv:
	rm -rf $(VENV)
