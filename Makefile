# phi_rnn — the commands a user needs. Everything installs itself on first use.
#   make train [THREADS=N] [POLICY=compact|scatter|balanced|none] [ARGS="--max_epochs 1 ..."]
#   make sample [CKPT=cv/<file>.npz] [ARGS="--length 500 --temperature 0.8"]
#   make test | bench | scale | submit ARGS="..." | topo | native | data | clean
#   make manycore-bundle   MKL + native/build packed for bench/scale/manycore.sh on a bare machine
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR := data/tinyshakespeare
# Offline machines: a local directory holding tinyshakespeare.txt. The machines this project
# is developed and tested on have it in the offline data mirror ../shared/data.
DATA_MIRROR ?= $(wildcard ../shared/data)
THREADS ?=
POLICY ?= compact
CKPT ?= latest
ARGS ?=

THREAD_FLAGS := $(if $(THREADS),--threads $(THREADS)) --policy $(POLICY)

.PHONY: install native data train sample test bench scale manycore-bundle submit topo clean

install: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,plots,mpi]"
	-$(MAKE) --no-print-directory native
	touch $@

native:
	$(MAKE) -C native

data: $(DATA_DIR)/input.txt
$(DATA_DIR)/input.txt: | $(STAMP)
	$(PY) -m phi_rnn data --data_dir $(DATA_DIR) $(if $(DATA_MIRROR),--mirror $(DATA_MIRROR))

train: $(STAMP) $(DATA_DIR)/input.txt
	$(PY) -m phi_rnn train --data_dir $(DATA_DIR) $(THREAD_FLAGS) $(ARGS)

sample: $(STAMP)
	$(PY) -m phi_rnn sample $(CKPT) $(THREAD_FLAGS) $(ARGS)

test: $(STAMP) $(DATA_DIR)/input.txt
	$(PY) -m pytest -q tests $(ARGS)

bench: $(STAMP)
	$(PY) bench/speed.py $(if $(THREADS),--threads $(THREADS)) $(ARGS)

scale: $(STAMP)
	$(PY) -m bench.scale $(ARGS)

manycore-bundle: $(STAMP)
	bash bench/scale/manycore.sh bundle

submit: $(STAMP)
	$(PY) -m phi_rnn submit $(ARGS)

topo: $(STAMP)
	$(PY) -m phi_rnn topo $(THREAD_FLAGS) $(ARGS)

clean:
	rm -rf native/build .pytest_cache
