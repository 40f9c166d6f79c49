.PHONY: install test test-all quality style demo bench

install:
	python -m pip install torch==2.13.0
	python -m pip install -e ".[dev]"

test:
	python -m pytest -q -m "not gpu"

quality:
	ruff check .
	ruff format --check .

style:
	ruff check --fix .
	ruff format .

demo:
	hf-wb inspect minilm
	python scripts/run_glue.py configs/glue/mrpc.yaml --max_train_samples 512 --num_train_epochs 1

bench:
	python benchmarks/monitoring_overhead.py
	python benchmarks/bias_prior.py
	python benchmarks/throughput.py
	python benchmarks/glue_compare.py
