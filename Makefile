# hvd_largebatch: `make test` and `make demo` install what they need first (scripts/setup.sh is idempotent).
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: setup test demo bench clean

setup:  ## install OpenMPI, the pinned venv, Horovod (built once, cached) and the package
	@bash scripts/setup.sh

test: setup  ## the whole suite: unit, parity, parallel (horovodrun -np 2) and example smoke tests
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup  ## the main job
	@mkdir -p results
	$(VENV)/bin/hvd-largebatch schedule --base-lr 0.1 --base-batch 256 --global-batch 8192 \
		--epochs 90 --warmup-epochs 5 --decay step --dataset-size 1281167 \
		--plot results/goyal_imagenet_schedule.png

bench: setup  ## optimizer step-time benchmarks (ratios measured side by side)
	$(PY) benchmarks/torch_optimizers.py
	$(PY) benchmarks/keras_optimizers.py

clean:
	rm -rf build dist *.egg-info results .pytest_cache
