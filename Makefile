# Benchmarks (BENCHMARKS.md). `make bench` is the full measurement: run it on a quiet machine
# (nothing else on the CPU), it takes hours at 10^8 rows. `make bench-smoke` runs every script at
# its smoke size into $(SMOKE_OUT) in about a minute: what tests/benchmarks/ checks.
PY ?= .venv/bin/python
OUT ?= benchmarks/results
SMOKE_OUT ?= /tmp/ray-pinet-bench-smoke

.PHONY: bench bench-data bench-train bench-allreduce bench-smoke bench-ingest

bench: bench-data bench-train bench-allreduce

bench-data:
	$(PY) benchmarks/data_pipeline.py --sizes 1e6 1e7 1e8 --out $(OUT)/data_pipeline

bench-train:
	$(PY) benchmarks/train_throughput.py --config configs/beauty.yaml --methods joint pinet \
		--workers 1 2 --epochs 3 --out $(OUT)/train_throughput

bench-allreduce:
	$(PY) benchmarks/allreduce.py --params 1e5 1e6 1e7 1e8 --out $(OUT)/allreduce

bench-smoke:
	$(PY) benchmarks/data_pipeline.py --smoke --out $(SMOKE_OUT)/data_pipeline --work-dir $(SMOKE_OUT)/work
	$(PY) benchmarks/allreduce.py --smoke --out $(SMOKE_OUT)/allreduce
	$(PY) benchmarks/train_throughput.py --smoke --out $(SMOKE_OUT)/train_throughput --work-dir $(SMOKE_OUT)/work
	$(PY) benchmarks/train_ingest.py --smoke-test --out $(SMOKE_OUT)/train_ingest.json
	$(PY) benchmarks/ray_data_vs_tasks.py --smoke-test --out $(SMOKE_OUT)/ray_data_vs_tasks.json

# One rank's training ingest (BENCHMARKS.md section 4) on a prepared folder: INGEST_DATA=<folder>
# (e.g. `ray-pinet prepare` of `ray-pinet synth --rows 100000000`), 1 and 2 workers.
bench-ingest:
	$(PY) benchmarks/train_ingest.py --data $(INGEST_DATA) --world 1 --out $(OUT)/train_ingest/ingest-w1.json
	$(PY) benchmarks/train_ingest.py --data $(INGEST_DATA) --world 2 --out $(OUT)/train_ingest/ingest-w2.json
