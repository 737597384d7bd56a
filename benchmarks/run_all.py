"""`make bench`: every benchmark, one final JSON line with the ratios the issues ask for.

python benchmarks/run_all.py            # ~1 GiB state, the 256 MiB step-overhead model in both modes, the cost
                                        # curve to 4 GiB (needs ~9 GiB RAM and disk); see docs/performance.md
python benchmarks/run_all.py --quick    # 256 MiB state, short loops, 16-64 MiB curve
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

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
    t_start = time.perf_counter()
    size = 256 if a.quick else 1024
    py = sys.executable
    save = last_json([py, os.path.join(HERE, "bench_save.py"), "--size-mb", str(size), "--dir", a.dir])
    final: dict = {"size_mb": size, "io": save.get("io")}
    for k in (
        "stall_vs_copy",
        "stall_vs_copy_best",
        "sync_speedup",
        "persist_efficiency",
        "persist_efficiency_with_retention",
        "persist_efficiency_incl_deletion",
        "restore_vs_raw",
        "restore_speedup",
        "restore_cold_vs_raw_cold",
        "peak_extra_rss",
    ):
        final[k] = save[k]
    final["cold_method"] = save.get("cold_method")
    # Step overhead in both job models (see bench_step_overhead.py), async and sync side by side in each run.
    steps = ["--every", "5", "--periods", "2"] if a.quick else []
    for mode in ("accel", "cpu"):
        over = last_json(
            [py, os.path.join(HERE, "bench_step_overhead.py"), "--mode", mode, "--compare-sync"]
            + ["--dir", os.path.join(a.dir, f"overhead-{mode}")]
            + steps
        )
        final[f"step_overhead_{mode}"] = over["step_overhead"]
        final[f"step_overhead_sync_{mode}"] = over["step_overhead_sync"]
        # The lowest and highest save period's overhead: how noisy the machine was during this run.
        final[f"step_overhead_{mode}_range"] = over["step_overhead_range"]
    final["step_overhead"] = final["step_overhead_cpu"]  # the key earlier runs reported (CPU-bound mode)
    scaling = last_json(
        [py, os.path.join(HERE, "bench_scaling.py"), "--dir", os.path.join(a.dir, "scaling")]
        + (["--quick"] if a.quick else [])
    )
    for k in (
        "scaling_max_deviation",
        "blocking_s_per_gib",
        "persist_s_per_gib",
        "restore_s_per_gib",
        "restore_cold_s_per_gib",
        "restore_fresh_s_per_gib",
        "scaling_fresh_deviation",
        "many_small_vs_few_large_blocking",
        "many_small_vs_few_large_persist",
        "many_small_vs_few_large_restore",
    ):
        final[k] = scaling[k]
    final["peak_extra_rss_max"] = max(scaling["peak_extra_rss_max"], save["peak_extra_rss"])
    seeding = last_json([py, os.path.join(HERE, "bench_seeding.py"), "--repeats", "3" if a.quick else "5"])
    final["seeding_us_per_sample"] = seeding["seed_us_per_sample"]  # per-sample RNG seeding in a loader worker
    final["seeding_fraction"] = seeding["seed_fraction"]  # of a PNG decode + augment __getitem__
    if os.path.exists(os.path.join(HERE, "bench_remote.py")):
        try:
            rem = last_json([py, os.path.join(HERE, "bench_remote.py")])
            final.update({k: v for k, v in rem.items() if k != "bench"})
        except subprocess.CalledProcessError as e:
            print(f"bench_remote failed: {e.stderr[-500:]}", file=sys.stderr)
    final["bench_seconds"] = round(time.perf_counter() - t_start)
    print(json.dumps(final))


if __name__ == "__main__":
    main()
