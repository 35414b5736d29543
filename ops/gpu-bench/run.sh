#!/usr/bin/env bash
# Runs on the device machine: unpack the carried deps, check the GPU path, run bench train --gpu.
set -o pipefail
t0=$(date +%s)
mkdir -p /tmp/site && tar -xJf .whl/site.tar.xz -C /tmp/site && tar -xJf .whl/pandas.tar.xz -C /tmp/site || exit 3
export PYTHONPATH=/tmp/site:$PWD SCMM_ATLAS_SHARED=$PWD/.whl/shared PYTHONUNBUFFERED=1 RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
echo "unpacked in $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'PY' 2>&1 | tee $OUT/probe.log
import torch, pandas, ray, zarr, scvi, anndata
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "pandas", pandas.__version__, "ray", ray.__version__,
      "zarr", zarr.__version__, "scvi", scvi.__version__, "anndata", anndata.__version__, "cpus", __import__("os").cpu_count())
import numpy as np, scipy.sparse as sp
from scmm_atlas.data.blocks import SparseBlock
from scmm_atlas.data.batches import to_dense
m = sp.random(300, 50, density=0.1, format="csr", dtype=np.float32, random_state=0)
b = SparseBlock({"RNA": m}, {"cell": np.arange(300), "batch": np.zeros(300, np.int64), "has_RNA": np.ones(300, bool)})
xg, mg, cg = to_dense(b, "cuda", pin_memory=True)
xc, _, _ = to_dense(b, "cpu")
torch.cuda.synchronize()
print("to_dense cuda == cpu:", torch.equal(xg["RNA"].cpu(), xc["RNA"]), xg["RNA"].device, cg.device)
PY
python3 -m scmm_atlas.cli bench train --gpu ${EPOCHS:+--epochs $EPOCHS} --workdir /tmp --json $OUT/gpu.json 2>&1 | tee $OUT/bench.log
echo "total $(( $(date +%s) - t0 )) s"
