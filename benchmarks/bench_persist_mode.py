"""Thread or process for the background persist? Measures how much each slows the training step.

A training loop runs while the same staged state (~768 MiB: a 256 MiB model + AdamW moments) is written
continuously in the background, once by a thread of the training process (what resumekit does) and once by a
separate worker process reading the staging buffers from shared memory. Reported: step time with no writer, with
each writer, and each writer's durable throughput. One JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time

import torch
import torch.multiprocessing as mp


def _write_loop(directory, tensors, stop, done_bytes, start_step):
    from resumekit.checkpointers.native import write_checkpoint
    from resumekit.storage import LocalStorage

    st = LocalStorage(directory)
    step = start_step
    while not stop.is_set():
        step += 1
        res = write_checkpoint(st, step, {"state": {}}, tensors)
        done_bytes.value += res.manifest.total_bytes
        st.remove_tree(f"step_{step - 1:09d}")


def _proc_main(directory, tensors, stop, done_bytes):
    torch.set_num_threads(1)
    _write_loop(directory, tensors, stop, done_bytes, 10_000)


class _Counter:
    def __init__(self):
        self.value = 0


def steps_time(model, opt, x, n):
    t = time.perf_counter()
    for _ in range(n):
        loss = model(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-mb", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dir", default="bench-out/persist-mode")
    a = p.parse_args()
    width = 2048
    layers = max(1, round((a.model_mb << 20) / (4 * (width * width + width))))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(a.batch, width)
    steps_time(model, opt, x, 2)
    staged = {}
    for i, p_ in enumerate(model.parameters()):
        staged[f"p{i}"] = p_.detach().clone().share_memory_()
        for k, v in opt.state[p_].items():
            if isinstance(v, torch.Tensor) and v.dim():
                staged[f"p{i}.{k}"] = v.detach().clone().share_memory_()
    nbytes = sum(t.numel() * t.element_size() for t in staged.values())
    res = {"state_mb": nbytes >> 20, "batch": a.batch}
    res["step_s_idle"] = steps_time(model, opt, x, a.steps)

    shutil.rmtree(a.dir, ignore_errors=True)
    stop, cnt = threading.Event(), _Counter()
    th = threading.Thread(target=_write_loop, args=(os.path.join(a.dir, "t"), staged, stop, cnt, 0), daemon=True)
    t0 = time.perf_counter()
    th.start()
    res["step_s_thread"] = steps_time(model, opt, x, a.steps)
    stop.set()
    th.join()
    res["thread_mb_s"] = cnt.value / (time.perf_counter() - t0) / 2**20

    ctx = mp.get_context("spawn")
    pstop, pcnt = ctx.Event(), ctx.Value("q", 0)
    proc = ctx.Process(target=_proc_main, args=(os.path.join(a.dir, "p"), staged, pstop, pcnt), daemon=True)
    proc.start()
    while pcnt.value == 0 and proc.is_alive():  # started and writing (torch import excluded)
        time.sleep(0.05)
    t0 = time.perf_counter()
    b0 = pcnt.value
    res["step_s_process"] = steps_time(model, opt, x, a.steps)
    res["process_mb_s"] = (pcnt.value - b0) / (time.perf_counter() - t0) / 2**20
    pstop.set()
    proc.join(60)
    shutil.rmtree(a.dir, ignore_errors=True)
    res["slowdown_thread"] = res["step_s_thread"] / res["step_s_idle"] - 1
    res["slowdown_process"] = res["step_s_process"] / res["step_s_idle"] - 1
    print(
        json.dumps({"bench": "persist_mode", **{k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}})
    )


if __name__ == "__main__":
    main()
