#!/usr/bin/env bash
# One prepared GPU check for a lent device machine (NVIDIA H200, see the device tool's README).
#
# Here, once (this machine can reach PyPI; the device machine cannot):
#     bash benchmarks/gpu_check.sh --fetch-wheels        # cp312 wheels of what the device image lacks -> .whl/
#     echo /.whl/ >> .git/info/exclude
# There, as ONE device run (carry: [".whl"], timeout_s 540):
#     bash benchmarks/gpu_check.sh
# It runs benchmarks/pipeline_vs_model.py on the GPU (torch backend, bf16 autocast) over the bundled
# slide and a synthetic 40,000² px slide, samples GPU utilisation with nvidia-smi every 0.5 s, and
# prints s/mm² of tissue at 0.5 µm/px, mean/peak GPU utilisation, the ratio to the bare model and to
# the physical limit (the model over only the tissue's 256 px tiles), and the amplification.
# The forward passes are planned from the free GPU memory (wsi_nuclei/model/memory.py; summary.json forward_passes).
# Then benchmarks/chunk_size.py --forward-only on the GPU: seconds per core pixel by chunk size, to
# choose a GPU worker's chunk size by measurement (CPU workers: 1536 px, docs/performance.md).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS="segmentation-models-pytorch openslide-python openslide-bin tiffslide imagecodecs zarr numcodecs donfig crc32c
        dask distributed partd locket tblib zict tornado sortedcontainers cloudpickle toolz shapely orjson dask-jobqueue
        typer rich"
if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p .whl
    for w in $WHEELS; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux1_x86_64 --platform any -d .whl "$w" || echo "warning: no wheel for $w" >&2
    done
    du -sh .whl
    exit 0
fi

export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 WSI_NUCLEI_CACHE=/tmp/wsi-nuclei-cache
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('torch', torch.__version__)"

nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 > /tmp/gpu_util.csv &
SMI=$!
python3 benchmarks/pipeline_vs_model.py --device cuda --backends torch --threads 8 \
    --synthetic-side 40000 --dask --work /tmp/wsi-nuclei-gpu-bench | tee /tmp/pvm_gpu.txt
kill $SMI || true
# the GPU's cost per core pixel by chunk size (the CPU chose 1536 px by this table; a GPU has the
# memory for larger windows, whose context is a smaller share): bare forward passes, seconds
python3 benchmarks/chunk_size.py --forward-only --device cuda --backend torch --threads 8 \
    --sizes 1024,1536,2048,3072,4096 | tee /tmp/chunk_gpu.txt
python3 - <<'PY'
import json
rows = [l.split(",") for l in open("/tmp/gpu_util.csv") if l.strip()]
util = [float(r[0]) for r in rows]
mem = [float(r[1]) for r in rows]
res = json.loads(open("/tmp/pvm_gpu.txt").read().strip().splitlines()[-1])
print(f"GPU utilisation over the run: mean {sum(util) / max(len(util), 1):.0f} %, peak {max(util, default=0):.0f} %; "
      f"peak memory {max(mem, default=0) / 1024:.1f} GiB ({len(util)} samples)")
for r in res["rows"]:
    print(f"{r['slide']}: {r['s_per_mm2']} s/mm² of tissue at 0.5 µm/px, pipeline/model = {r['ratio']}, "
          f"pipeline/limit = {r['ratio_to_limit']} (limit: bare model over the tissue's 256 px tiles), amplification {r['amplification']}")
PY
if [ -n "${OUT:-}" ]; then cp /tmp/pvm_gpu.txt /tmp/gpu_util.csv /tmp/chunk_gpu.txt "$OUT"/ 2>/dev/null || true; fi
