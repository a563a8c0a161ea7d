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

DEMO_STUDY := --methods goyal,lars --batch-sizes 128,512,2048 --targets 0.9 --trials 2 --seeds 0 --epochs 0 \
	--workers 2 --out results/demo

demo: setup  ## the main job, short: a batch-size study under horovodrun -np 2, table + log-log plot in results/demo
	@rm -rf results/demo
	$(VENV)/bin/hvd-largebatch bench --framework torch $(DEMO_STUDY)

bench: setup  ## optimizer, CLARS, ConAdv and Horovod step-time benchmarks (ratios measured side by side)
	$(PY) benchmarks/torch_optimizers.py
	$(PY) benchmarks/keras_optimizers.py
	$(PY) benchmarks/conadv_step_time.py
	$(PY) benchmarks/clars_step_time.py
	$(PY) benchmarks/horovod_step_overhead.py

clean:
	rm -rf build dist *.egg-info results .pytest_cache
