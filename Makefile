# wsi-nuclei: `make demo` and `make test` set everything up in .venv on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch 2.14.1 + torchvision 0.29.1 (smp and timm need torchvision); override for another platform,
# e.g. make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo_out
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-fast test-slurm bench bench-memory lint clean train-v3

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev,onnx,openvino]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/wsi-nuclei segment wsi_nuclei/data/CMU-1-Small-Region.svs -o $(DEMO_OUT) --overwrite
	$(VENV)/bin/wsi-nuclei segment-image wsi_nuclei/data/cmu1_crop_x900_y720.png --mpp 0.499 -o $(DEMO_OUT)/crop
	@echo "outputs: $(DEMO_OUT)/CMU-1-Small-Region/{mask.zarr,nuclei.geojson.gz,nuclei.parquet,summary.json,overlay.png,density.png}"
	@echo "report:  $(DEMO_OUT)/report.html"

test: $(STAMP) lint
	$(PY) -m pytest -q -p no:cacheprovider

# the tests on a real one-node SLURM cluster (tests/slurm/cluster.sh; root; make test runs them too)
test-slurm: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m slurm

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check wsi_nuclei tests benchmarks workflows
	$(VENV)/bin/mypy wsi_nuclei

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache

bench: $(STAMP)
	$(PY) benchmarks/tnbc_image_time.py
	$(PY) benchmarks/geojson_speed.py
	$(PY) benchmarks/parquet_speed.py
	$(PY) benchmarks/pipeline_vs_model.py --dask
	$(PY) benchmarks/amplification.py
	$(PY) benchmarks/glass_context.py
	$(PY) benchmarks/chunk_size.py
	$(PY) benchmarks/dask_overhead.py
	$(PY) benchmarks/forward_memory.py
	$(PY) benchmarks/precision_gate.py
	$(PY) benchmarks/shape_cost.py
	$(PY) benchmarks/big_slide.py

bench-memory: $(STAMP)
	$(PY) benchmarks/memory_scaling.py --model shipped --sizes 1,4,16
	$(PY) benchmarks/memory_scaling.py --model standin --sizes 1,16 --huge 100000 --huge-tissue 0.5
	$(PY) benchmarks/worker_memory.py --limit 2.5GB
	$(PY) benchmarks/worker_memory.py --limit 4GB

# model v3's long training run (docs/model.md), resumed from runs/v3 or, on a new machine, from the
# state committed in checkpoints/v3; runs in the background at one thread (log: runs/v3.out)
V3_ARGS = --data monuseg,consep --stain-augment both --init wsi_nuclei/weights --types --context-pairs --freeze-bn \
	--crop 384 --lr 3e-4 --schedule cosine --epochs 600 --select worst_group --val-every 5 --probe-every 10 \
	--snapshot-every 50 --threads 1 --no-tune
DATA ?= ../shared/data
train-v3: $(STAMP)
	test -f runs/v3/state.pt || { mkdir -p runs && cp -r checkpoints/v3 runs/v3; }
	nohup $(VENV)/bin/wsi-nuclei train -o runs/v3 --data-root $(DATA) $(V3_ARGS) --resume >> runs/v3.out 2>&1 &
