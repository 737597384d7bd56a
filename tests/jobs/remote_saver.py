"""Saves native checkpoints in a loop to an object store, directly or through a local tier, until killed.

Torch-free (the storage layer is what the kill tests exercise, and a child that starts fast can be killed more
often). It behaves like ``CheckpointManager`` at the storage level: resume from the newest valid step, write data
files then the manifest through a transaction, apply ``keep_last=2`` retention after each commit (in tiered mode
through the tier, which defers deleting steps still to be uploaded).

    python remote_saver.py direct|tiered S3_URI LOCAL_TIER PAYLOAD_BYTES

Prints ``ready <first step>`` once set up, then ``saved <step>`` after every commit. Payload bytes are a pure
function of the step (:func:`payload`), so a test can check any checkpoint's content.
"""

from __future__ import annotations

import random
import sys

from resumekit.format import FileEntry, Manifest, new_hasher, step_dirname
from resumekit.layouts.native import NativeLayout
from resumekit.policy import RetentionPolicy

PAYLOAD = "payload.bin"
STATE = "state.json"
_CHUNK = 1 << 20


def payload(step: int, size: int) -> bytes:
    return random.Random(step).randbytes(size)


def save(storage, step: int, size: int) -> None:
    txn = storage.begin(step_dirname(step))
    try:
        files = {}
        data = payload(step, size)
        h = new_hasher()
        with txn.open_write(PAYLOAD) as f:
            for i in range(0, len(data), _CHUNK):
                f.write(data[i : i + _CHUNK])
        h.update(data)
        files[PAYLOAD] = FileEntry(len(data), h.hexdigest())
        blob = b'{"step": %d}' % step
        h = new_hasher()
        h.update(blob)
        with txn.open_write(STATE) as f:
            f.write(blob)
        files[STATE] = FileEntry(len(blob), h.hexdigest())
        txn.commit(Manifest(step=step, files=files).to_json())
    except BaseException:
        txn.abort()
        raise


def main() -> None:
    mode, uri, local_dir, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    policy = RetentionPolicy(keep_last=2)
    layout = NativeLayout()
    if mode == "tiered":
        from resumekit.storage.tiered import TieredStorage

        storage = TieredStorage(uri, local_dir, retention=policy)
        storage.resync()  # what CheckpointManager.restore does: re-upload what the last kill interrupted
    else:
        from resumekit.storage import open_storage

        storage = open_storage(uri)
    best, _ = layout.latest(storage, full=False)
    step = (best.step if best else 0) + 1
    print(f"ready {step}", flush=True)
    while True:
        save(storage, step, size)
        print(f"saved {step}", flush=True)
        valid = [i.step for i in layout.list(storage) if layout.validate(storage, i, full=False).valid]
        for s in policy.to_delete(valid, protected={step}):
            storage.remove_tree(step_dirname(s))
        step += 1


if __name__ == "__main__":
    main()
