# make demo: the main job on built-in data.  make test: the fast tier of the tests;
# make test-all: every test (what CI runs).
# Both create .venv from setup.cfg when it is missing or older than the package metadata.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo figures test test-all aot docs bench data-parallel suite suite-data corpus transfer study study-long study-frame \
	transfer-seeds clean-venv

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) train.py --config=configs/demo.py --workdir=workdirs/demo

figures: $(STAMP)
	$(PY) -m dwm_jax.plots --outdir docs/figures

# The .pth and HEAR tests need PyTorch: installed from this machine's disk when a CPU build
# lies there (pip's find-links); elsewhere they are skipped, saying so. hearvalidator comes
# without its tensorflow requirement (the HEAR test stands in for its tf.Module check).
TORCH_STAMP := $(VENV)/.torch
$(TORCH_STAMP): $(STAMP)
	if $(PY) -m pip install -q --no-deps --no-index torch==2.13.0 >/dev/null 2>&1; \
	    then $(PY) -m pip install -q torch==2.13.0; \
	else echo "no local PyTorch CPU wheel: the .pth converter and HEAR tests will be skipped"; fi
	$(PY) -m pip install -q --no-deps hearvalidator==2021.0.2 || \
	    echo "hearvalidator could not be installed: its rules are checked by tests/test_hear.py"
	touch $(TORCH_STAMP)

# Apache Beam for the parallel dataset builds (an optional extra: demo does not need it)
BEAM_STAMP := $(VENV)/.beam
$(BEAM_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[beam]'
	touch $(BEAM_STAMP)

# Debian packages the evaluation suite's audio comes from (speech and General MIDI); where
# apt-get is missing or fails, the suite's tests are skipped, saying so
DEBS := espeak-ng fluidsynth fluid-soundfont-gm
DEBS_STAMP := $(VENV)/.debs
$(DEBS_STAMP): $(STAMP)
	if ! command -v espeak-ng >/dev/null || ! command -v fluidsynth >/dev/null \
	    || ! test -f /usr/share/sounds/sf2/FluidR3_GM.sf2; then \
	  (apt-get install -y -q $(DEBS) >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 \
	    && apt-get install -y -q $(DEBS) >/dev/null 2>&1)) \
	  || echo "could not install $(DEBS): the suite's tests will be skipped"; fi
	touch $(DEBS_STAMP)

# ONNX export for its tests: jax2onnx pins an older Orbax than this package's, so it and
# what it imports are installed without their requirements (they work with ours)
ONNX_PKGS := jax2onnx==0.17.1 onnx==1.23.2 onnx-ir==1.1.0 onnxruntime==1.32.0 \
	dm-pix==0.4.5 equinox==0.13.8 jaxtyping==0.3.11 wadler-lindig==0.1.8 chex==0.1.92 \
	toolz==1.2.0 protobuf sympy mpmath
ONNX_STAMP := $(VENV)/.onnx
$(ONNX_STAMP): $(STAMP) $(TORCH_STAMP) $(BEAM_STAMP)
	$(PY) -m pip install -q --no-deps $(ONNX_PKGS) || \
	    echo "jax2onnx could not be installed: the ONNX tests will be skipped"
	# sed_eval's dcase_util imports pkg_resources, which setuptools 81 removed; installed
	# after torch and Beam, whose installs may bring a newer setuptools
	$(PY) -m pip install -q "setuptools<81"
	touch $(ONNX_STAMP)

# PSDS (the frame-level probe's PSDS1 / PSDS2) through sed_scores_eval: it names the PyPI
# `pathlib` backport and Cython among its requirements, which Python 3.11 does not need, so
# it comes without them; pandas below 3, whose read-only arrays its compiled code rejects
PSDS_STAMP := $(VENV)/.psds
$(PSDS_STAMP): $(STAMP) $(ONNX_STAMP)
	$(PY) -m pip install -q "pandas>=2.2,<3" && \
	    $(PY) -m pip install -q --no-deps sed_scores_eval==0.0.4 lazy_dataset==0.0.15 \
	    einops==0.8.2 || echo "sed_scores_eval could not be installed: PSDS is left out"
	touch $(PSDS_STAMP)

# Compiling for TPU and GPU targets (python -m dwm_jax.compile) in a venv of its own: libtpu
# and the CUDA plugin stay out of the main venv, whose jax then starts only its CPU backend
AOT_VENV  := .venv-aot
AOT_STAMP := $(AOT_VENV)/.installed
$(AOT_STAMP): setup.cfg pyproject.toml
	test -x $(AOT_VENV)/bin/python || $(PYTHON) -m venv $(AOT_VENV)
	$(AOT_VENV)/bin/python -m pip install -q --upgrade pip
	$(AOT_VENV)/bin/python -m pip install -q -e '.[tpu,cuda]' || \
	    echo "libtpu or the CUDA plugin could not be installed: the compile tests will be skipped"
	touch $(AOT_STAMP)

aot: $(AOT_STAMP)

# the documentation site: docs/_build/html (warnings are errors)
DOCS_STAMP := $(VENV)/.docs
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[docs]'
	touch $(DOCS_STAMP)

# the fast tier (what a contributor runs before each commit) and the whole suite (CI)
# The fast tier draws fewer examples in the property tests (each new grid shape compiles);
# the whole suite draws the full number.
FAST_EXAMPLES ?= 3
test: $(STAMP) $(TORCH_STAMP) $(BEAM_STAMP) $(DEBS_STAMP) $(ONNX_STAMP) $(PSDS_STAMP)
	HYPOTHESIS_EXAMPLES=$(FAST_EXAMPLES) $(PY) -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP) $(TORCH_STAMP) $(BEAM_STAMP) $(DEBS_STAMP) $(DOCS_STAMP) $(ONNX_STAMP) \
	$(PSDS_STAMP) $(AOT_STAMP)
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

# the masking study at frame level: the demo recipe's strategies (5 x 3 seeds), each probed
# on synthetic_sounds and, where in time, on the suite's scenes (docs/results/frame_level.md)
study-frame: $(STAMP)
	$(PY) -m dwm_jax.data synthetic_sounds --data_dir data
	$(PY) -m dwm_jax.suite --out suite --data_dir data --tasks scenes
	$(PY) -m dwm_jax.study --outdir docs/study_frame \
	    --tasks synthetic_sounds,audio_folder/suite_scenes

# the cross-domain evaluation suite (dwm_jax.suite.py): audio under suite/, datasets
# audio_folder/suite_<task> under data/, and the raw log-mel check of every task
suite: $(STAMP) $(DEBS_STAMP)
	$(PY) -m dwm_jax.suite --out suite --data_dir data

# the unlabelled pretraining corpus across domains (dwm_jax.suite.corpus.py): audio_folder/corpus
HOURS ?= 3
corpus: $(STAMP) $(DEBS_STAMP)
	$(PY) -m dwm_jax.suite.corpus --out corpus --data_dir data --hours $(HOURS)

# the transfer targets below need them: the corpus is built once; the suite's tasks are
# remade only where their generator changed since (seconds when nothing did)
SUITE_DATA  := suite-data
CORPUS_DATA := data/audio_folder/corpus
suite-data: $(STAMP) $(DEBS_STAMP)
	$(PY) -m dwm_jax.suite --out suite --data_dir data --no_check
$(CORPUS_DATA): | $(STAMP) $(DEBS_STAMP)
	$(PY) -m dwm_jax.suite.corpus --out corpus --data_dir data --hours $(HOURS)

# the transfer recipe (configs/transfer.py) pretrained on the corpus, its learning curve on
# the suite (every checkpoint), then eval.py's table of its last checkpoint
transfer: $(SUITE_DATA) $(CORPUS_DATA)
	$(PY) train.py --config=configs/transfer.py --workdir=workdirs/transfer
	$(PY) -m dwm_jax.study.curve --workdir=workdirs/transfer --tasks=suite
	$(PY) eval.py --workdir=workdirs/transfer --tasks=suite --data_dir=data

# the masking study on the transfer recipe: 5 strategies x SEEDS pretrained on the corpus and
# probed on the suite; resumes where it stopped (finished runs are kept in results.json)
SEEDS ?= 0,1,2
study: $(SUITE_DATA) $(CORPUS_DATA)
	$(PY) -m dwm_jax.study --config=configs/transfer.py --tasks=suite --seeds=$(SEEDS) \
	    --pool=mean,mean_std --outdir=docs/study_transfer

# the long transfer recipe (configs/transfer_long.py, 5940 steps, ~31 min a seed alone) with
# seeds 0, 1 and 2, each probed on the suite at its end: docs/transfer_long/results*.md
transfer-seeds: $(SUITE_DATA) $(CORPUS_DATA)
	$(PY) -m dwm_jax.study --config=configs/transfer_long.py --strategies=dispersion \
	    --tasks=suite --seeds=$(SEEDS) --pool=mean,mean_std --outdir=docs/transfer_long

# the masking study on the long recipe, beside its DWM runs in docs/transfer_long (~31 min a
# run alone, SGIM ~1.8x): make study-long [STRATEGIES=random,inverse_block] [SEEDS=0]; resumes
STRATEGIES ?= random,inverse_block,dispersion,dispersion_h0,sgim
study-long: $(SUITE_DATA) $(CORPUS_DATA)
	$(PY) -m dwm_jax.study --config=configs/transfer_long.py --strategies=$(STRATEGIES) \
	    --tasks=suite --seeds=$(SEEDS) --pool=mean,mean_std --outdir=docs/transfer_long

# a parallel build of a folder of audio files: make data-parallel AUDIO_DIR=... NAME=... WORKERS=8
WORKERS ?= 2
data-parallel: $(BEAM_STAMP)
	$(PY) -m dwm_jax.data audio_folder --name $(NAME) --audio_dir $(AUDIO_DIR) \
	    --data_dir data --workers $(WORKERS)

docs: $(DOCS_STAMP)
	$(PY) -m sphinx -W --keep-going -E -b html docs docs/_build/html

bench: $(STAMP)
	$(PY) -m benchmarks.masking
	$(PY) -m benchmarks.data --data_dir data

clean-venv:
	rm -rf $(VENV)
