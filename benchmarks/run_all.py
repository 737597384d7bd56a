"""`make bench`: every benchmark, one final JSON line with the ratios the issues ask for.

python benchmarks/run_all.py            # ~1 GiB state (and the 256 MiB step-overhead model)
python benchmarks/run_all.py --quick    # 256 MiB state
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def last_json(cmd) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    sys.stdout.write(out)
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dir", default="bench-out")
    a = p.parse_args()
    size = 256 if a.quick else 1024
    py = sys.executable
    save = last_json([py, os.path.join(HERE, "bench_save.py"), "--size-mb", str(size), "--dir", a.dir])
    over = last_json([py, os.path.join(HERE, "bench_step_overhead.py"), "--dir", os.path.join(a.dir, "overhead")])
    final = {"size_mb": size}
    for k in (
        "stall_vs_copy",
        "sync_speedup",
        "persist_efficiency",
        "restore_vs_raw",
        "restore_speedup",
        "peak_extra_rss",
    ):
        final[k] = save[k]
    final["step_overhead"] = over["step_overhead"]
    seeding = last_json([py, os.path.join(HERE, "bench_seeding.py"), "--repeats", "3" if a.quick else "5"])
    final["seeding_us_per_sample"] = seeding["seed_us_per_sample"]  # per-sample RNG seeding in a loader worker
    final["seeding_fraction"] = seeding["seed_fraction"]  # of a PNG decode + augment __getitem__
    if os.path.exists(os.path.join(HERE, "bench_remote.py")):
        try:
            rem = last_json([py, os.path.join(HERE, "bench_remote.py")])
            final.update({k: v for k, v in rem.items() if k != "bench"})
        except subprocess.CalledProcessError as e:
            print(f"bench_remote failed: {e.stderr[-500:]}", file=sys.stderr)
    print(json.dumps(final))


if __name__ == "__main__":
    main()
