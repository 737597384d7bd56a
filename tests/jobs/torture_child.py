"""Child of the kill-during-save torture test: saves forever; each step's tensors are filled with the step number."""


def expected_value(step: int) -> float:
    return float(step % 1000)


def save_loop(directory: str, start: int, ready, async_save: bool = False) -> None:
    import torch

    from resumekit import CheckpointManager

    torch.set_num_threads(1)
    mgr = CheckpointManager(directory, keep_last=3, async_save=async_save, handle_sigterm=False)
    sizes = [1 << 20, 3 << 18, 1 << 16]
    step = start
    ready.set()
    while True:
        step += 1
        v = expected_value(step)
        state = {
            "weights": {f"w{i}": torch.full((sizes[(step + i) % 3],), v) for i in range(3)},
            "meta": {"step": step, "note": "x" * (step % 50)},
        }
        mgr.save(step, state)
