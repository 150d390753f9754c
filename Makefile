# Shortcuts for the benchmark, the training example and the tests.
# The benchmark runs the installed package (pip install ".[benchmark]").
#   make benchmark BENCH_ARGS="--dtype bfloat16 --plot bench.png"
#   make train TRAIN_ARGS="--seq-len 8192"
#   make test PYTHON=/path/to/venv/bin/python

PYTHON ?= python
BENCH_ARGS ?=
TRAIN_ARGS ?=
BENCHMARK = $(PYTHON) -m fcsa.benchmark
# The CPU comparison the README reports: b=2, h=8, d=64, float32.
CPU_TABLE = --device cpu --batch 2 --heads 8 --dim 64 --dtype float32

.PHONY: benchmark benchmark_causal benchmark_forward benchmark_backward \
        benchmark_forward_causal benchmark_backward_causal benchmark_cpu train test

benchmark:
	$(BENCHMARK) $(BENCH_ARGS)

benchmark_causal:
	$(BENCHMARK) --causal $(BENCH_ARGS)

benchmark_forward:
	$(BENCHMARK) --only-forwards $(BENCH_ARGS)

benchmark_backward:
	$(BENCHMARK) --only-backwards $(BENCH_ARGS)

benchmark_forward_causal:
	$(BENCHMARK) --only-forwards --causal $(BENCH_ARGS)

benchmark_backward_causal:
	$(BENCHMARK) --only-backwards --causal $(BENCH_ARGS)

benchmark_cpu:
	$(BENCHMARK) $(CPU_TABLE) --seq-lens 512 1024 2048 4096 --modes fwd fwd+bwd \
		--baselines sdpa-cos $(BENCH_ARGS)
	$(BENCHMARK) $(CPU_TABLE) --seq-lens 16384 --baselines naive sdpa-cos --memory-only \
		$(BENCH_ARGS)

train:
	$(PYTHON) examples/train.py --use-cuda-kernel $(TRAIN_ARGS)

test:
	$(PYTHON) -m pytest -q
