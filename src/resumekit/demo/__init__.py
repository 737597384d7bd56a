"""The crash-and-resume demonstration behind ``resumekit demo`` (and ``make demo``).

A small job is trained straight, then again under ``resumekit run`` while it is SIGKILLed at random moments (some
of them mid-save); the demo passes only if both runs end bitwise identical and saw the same batches.

Modules:
    core: what both demonstrations share (state comparison, crash statistics, the summary table, the kill loop's
        progress tail and process-tree cleanup).
    single: the single-process job and its kill loop; the job runs as ``python -m resumekit.demo.single``.
    distributed: the DDP job under torchrun and its kill loop; each rank runs as
        ``torchrun -m resumekit.demo.distributed``.
    nodes: several torchrun "nodes" on this machine, each under its own ``resumekit run``: launch lines and
        node processes.
    roots: what the multi-node kill loop observes of a shared directory or an object-store root (committed
        steps, saves and uploads in progress) and how the final steps are read back.
    multinode: the DDP job on those nodes, straight and with whole-node SIGKILLs.
"""

from __future__ import annotations

import sys

from .core import CrashStats, print_table, tree_diff


def run_demo(
    directory: str,
    crashes: int = 6,
    steps: int = 300,
    seed: int | None = None,
    nproc: int = 1,
    as_json: bool = False,
    save_every: int = 20,
    async_save: bool = False,
    nnodes: int = 1,
    root: str | None = None,
    node_tiers: bool = False,
) -> int:
    """Straight run vs killed-and-restarted run; the single-process job, or with ``nproc`` > 1 a DDP job under
    torchrun (sharded checkpoints, worker SIGKILLs), or with ``nnodes`` > 1 that job on several torchrun nodes
    (whole-node SIGKILLs).

    Args:
        directory: where both runs write.
        crashes: how many SIGKILLs.
        steps: the job's length.
        seed: the kill seed (random when None).
        nproc: processes (per node with ``nnodes`` > 1); 1 on 1 node runs the single-process demo.
        as_json: print one JSON object instead of the table.
        save_every: the job's checkpoint interval.
        async_save: the job writes checkpoints in the background.
        nnodes: torchrun nodes (separate agents on this machine, each under its own ``resumekit run``).
        root: (``nnodes`` > 1) the shared checkpoint root, a directory or an object-store URI (``s3://``,
            ``obs://``); None: ``directory``.
        node_tiers: (``nnodes`` > 1) a local tier directory per node (implied by an object-store ``root``).

    Returns:
        0 only if both runs end bitwise identical; else 1; 2 (nothing run) for an object-store ``directory``, or
        ``root``/``node_tiers`` on one node.
    """
    from ..storage import is_remote

    if is_remote(str(directory)):
        # The demo's own files (progress logs the kill loop tails, node logs, tiers) are local: the demo would kill
        # nothing mid-save, report PASS, and leave a local tree named "s3:". An object store is the nodes' root.
        sys.stderr.write(
            f"resumekit demo: --dir {directory} is an object store, but --dir is where the demo writes its local "
            "files (progress logs, node logs, tiers); for checkpoints in an object store run --nnodes 2 --root "
            f"{directory}; nothing was run\n"
        )
        return 2
    if nnodes == 1 and (root is not None or node_tiers):
        sys.stderr.write(
            "resumekit demo: --root and --node-tiers are options of the multi-node demo (--nnodes 2 or more); "
            "nothing was run\n"
        )
        return 2
    # Imported here, not at the top: the workers run as ``python -m resumekit.demo.single`` (and ``.distributed``),
    # and runpy warns on stderr when the package has already imported the module it is asked to run.
    if nnodes > 1:
        from .multinode import run_multinode_demo

        return run_multinode_demo(
            directory,
            nnodes=nnodes,
            nproc=nproc,
            crashes=crashes,
            steps=steps,
            seed=seed,
            as_json=as_json,
            save_every=save_every,
            async_save=async_save,
            root=root,
            node_tiers=node_tiers,
        )
    if nproc != 1:
        from .distributed import run_distributed_demo

        return run_distributed_demo(
            directory,
            nproc=nproc,
            crashes=crashes,
            steps=steps,
            seed=seed,
            as_json=as_json,
            save_every=save_every,
            async_save=async_save,
        )
    from .single import run_single_demo

    return run_single_demo(
        directory,
        crashes=crashes,
        steps=steps,
        seed=seed,
        as_json=as_json,
        save_every=save_every,
        async_save=async_save,
    )


__all__ = ["CrashStats", "print_table", "run_demo", "tree_diff"]
