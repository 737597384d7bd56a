"""Check that the wheel installs and works on its own, and with each optional extra on its own.

For the bare package and for each extra (``s3``, ``report``, ``yaml``, ``hf``): a fresh virtual environment, the
wheel installed as a user would (``pip install "resumekit[s3] @ file://...whl"``, no dev extras), then a smoke test
that imports what that extra is for. A missing or wrong dependency in ``[project.optional-dependencies]`` fails here,
where the test suite (which installs every extra at once through ``dev``) cannot see it.

Slow (a venv and torch per extra, packages from the index): run by ``make check-extras``, not by ``make check``.

    python scripts/check_extras.py                    # the bare install and every extra
    python scripts/check_extras.py --only base,s3     # some of them
    python scripts/check_extras.py --wheel dist/resumekit-0.1.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The Makefile's pin; on this project's machines it resolves to a local CPU wheel (see the Makefile).
TORCH = "torch==2.13.0"

# What each install must be able to do. The bare one is the acceptance check of a user install: the CLI starts and
# the package imports (both without torch being imported).
SMOKE: dict[str, list[list[str]]] = {
    "base": [
        ["resumekit", "--help"],
        ["resumekit", "--version"],
        ["python", "-c", "import resumekit, sys; assert 'torch' not in sys.modules; print(resumekit.__version__)"],
        ["python", "-c", "from resumekit import CheckpointManager, CheckpointOptions; print('engine imports')"],
    ],
    "s3": [["python", "-c", "import s3fs, fsspec; import resumekit.storage.remote.client; print('s3 imports')"]],
    "report": [["python", "-c", "import matplotlib.figure; import resumekit.report; print('report imports')"]],
    "yaml": [["python", "-c", "from ruamel.yaml import YAML; import resumekit.yamlconfig; print('yaml imports')"]],
    "hf": [["python", "-c", "import safetensors, accelerate; import resumekit.integrations.hf; print('hf imports')"]],
}


def build_wheel(outdir: Path) -> Path:
    # sdist first, then the wheel from the unpacked sdist (what `build` does without --wheel): a wheel built from the
    # work tree would reuse build/lib, where a module deleted from src/ lingers.
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(outdir), "."],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return next(outdir.glob("resumekit-*.whl"))


def check(extra: str, wheel: Path, workdir: Path) -> tuple[bool, str]:
    venv = workdir / f"venv-{extra}"
    bindir = venv / "bin"
    requirement = f"resumekit @ {wheel.as_uri()}" if extra == "base" else f"resumekit[{extra}] @ {wheel.as_uri()}"
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        # torch first and pinned, so that the extra's resolver does not pick another (several GB) build.
        [str(bindir / "pip"), "install", "-q", TORCH],
        [str(bindir / "pip"), "install", "-q", requirement],
    ]
    steps += [[str(bindir / cmd[0]), *cmd[1:]] for cmd in SMOKE[extra]]
    for cmd in steps:
        # Run from the temporary folder, so that `import resumekit` cannot find the work tree's src/.
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
        if proc.returncode != 0:
            return False, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return True, "ok"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(SMOKE)}")
    parser.add_argument("--wheel", help="an already built wheel (default: build one)")
    args = parser.parse_args()
    extras = args.only.split(",") if args.only else list(SMOKE)
    unknown = [e for e in extras if e not in SMOKE]
    if unknown:
        parser.error(f"unknown extra(s) {unknown}; known: {list(SMOKE)}")
    failed = []
    with tempfile.TemporaryDirectory(prefix="resumekit-extras-") as tmp:
        workdir = Path(tmp)
        wheel = Path(args.wheel).resolve() if args.wheel else build_wheel(workdir / "dist")
        for extra in extras:
            start = time.monotonic()
            ok, detail = check(extra, wheel, workdir)
            print(f"{extra:7s} {'ok' if ok else 'FAILED'} ({time.monotonic() - start:.0f} s)", flush=True)
            if not ok:
                print(detail)
                failed.append(extra)
    if failed:
        print(f"extras that do not install or work on their own: {', '.join(failed)}")
        return 1
    print(f"all {len(extras)} install(s) work on their own")
    return 0


if __name__ == "__main__":
    sys.exit(main())
