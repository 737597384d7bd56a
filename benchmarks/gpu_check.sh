#!/usr/bin/env bash
# One short GPU check for a lent accelerator machine (never part of `make test`):
#   - the async save path with a CUDA state: pinned staging buffers, non-blocking D2H copies, one sync;
#   - the same ratios as bench_save.py, with copy_s = the device-to-host copy floor into pinned memory;
#   - a bitwise save/restore round trip of a CUDA model + optimizer, RNG of every device included;
#   - the cost curve (bench_scaling.py) for CUDA states: blocking (device-to-host into the page-locked staging
#     image), persist (O_DIRECT from that image), restore into the model (in place) warm and cold and into fresh
#     host memory, peak extra RSS, at SCALING_SIZES MiB, SCALING_ROUNDS rounds (default 3; 1 to save device time).
# Usage: bash benchmarks/gpu_check.sh [SIZE_MB]   (default 1024; prints one JSON line per part)
#   SCALING_SIZES=256,1024,2048,4096 (default) or "" to skip the curve; the plot goes to ${OUT:-/tmp}.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB="${1:-1024}"
SCALING_SIZES="${SCALING_SIZES-256,1024,2048,4096}"
SCALING_ROUNDS="${SCALING_ROUNDS:-3}"
# Use the project venv when it exists, else the machine's python with torch preinstalled (the lent machine has no
# internet); resumekit itself runs from src/ and needs only numpy, xxhash and click besides torch.
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY="${PYTHON:-python3}"; export PYTHONPATH="$PWD/src"; fi
$PY - <<'PYEOF'
import torch, json
assert torch.cuda.is_available(), "no CUDA device visible"
print(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}))
PYEOF
$PY benchmarks/bench_save.py --size-mb "$SIZE_MB" --device cuda --dir "${TMPDIR:-/tmp}/rk-gpu-bench" --reps 3
$PY - <<'PYEOF'
import json, tempfile, torch
from resumekit import CheckpointManager
torch.manual_seed(0)
m = torch.nn.Linear(1024, 1024).cuda(); o = torch.optim.AdamW(m.parameters())
m(torch.randn(8, 1024, device="cuda")).sum().backward(); o.step()
d = tempfile.mkdtemp()
mgr = CheckpointManager(d, async_save=True); mgr.save(1, {"m": m, "o": o}); mgr.close()
ref_rng = torch.cuda.get_rng_state_all(); a = torch.rand(3, device="cuda")
m2 = torch.nn.Linear(1024, 1024).cuda(); o2 = torch.optim.AdamW(m2.parameters())
torch.cuda.manual_seed_all(123)
CheckpointManager(d).restore({"m": m2, "o": o2})
ok = all(torch.equal(x, y) for x, y in zip(m.state_dict().values(), m2.state_dict().values()))
ok &= torch.equal(o.state_dict()["state"][0]["exp_avg"], o2.state_dict()["state"][0]["exp_avg"])
ok &= torch.equal(torch.rand(3, device="cuda"), a)  # CUDA RNG restored to the saved point
print(json.dumps({"gpu_roundtrip_bitwise": bool(ok)}))
PYEOF
if [ -n "$SCALING_SIZES" ]; then
  $PY benchmarks/bench_scaling.py --device cuda --sizes "$SCALING_SIZES" --dir "${TMPDIR:-/tmp}/rk-gpu-scaling" \
    --rounds "$SCALING_ROUNDS" --plot "${OUT:-/tmp}/scaling-cuda.png"
fi
