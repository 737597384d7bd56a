"""The packaging gate of `make check`: build the sdist and the wheel, fail on any build warning, `twine check` both.

Also checks what a user's install depends on: the wheel carries ``py.typed`` and the console script, its version is
``resumekit.__version__``, and the sdist holds everything the wheel is built from (the wheel is built from the
unpacked sdist, as pip does, not from the work tree).

Builds without isolation (the backend comes from .venv, installed by the ``dev`` extra): an isolated build would
download setuptools into a fresh environment on every run. Usage: ``python scripts/check_package.py [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# setuptools and build print warnings as "SetuptoolsDeprecationWarning", "warning: ...", "WARNING ...".
WARNING = re.compile(r"warning", re.IGNORECASE)
# Not about the package: setuptools says this when PYTHONDONTWRITEBYTECODE is set, as it is on some machines.
BENIGN = re.compile(r"byte-compiling is disabled")


def source_version() -> str:
    """``__version__`` read from the source without importing the package (that would need torch)."""
    tree = ast.parse((ROOT / "src" / "resumekit" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit("src/resumekit/__init__.py has no __version__")


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        print(out)
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="build into this folder and keep the artifacts (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="resumekit-dist-") as tmp:
        outdir = Path(args.keep or tmp)
        out = run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(outdir), "."])
        problems = [line for line in out.splitlines() if WARNING.search(line) and not BENIGN.search(line)]
        version = source_version()
        sdists = sorted(outdir.glob(f"resumekit-{version}.tar.gz"))
        wheels = sorted(outdir.glob(f"resumekit-{version}-py3-none-any.whl"))
        if len(sdists) != 1 or len(wheels) != 1:
            names = sorted(p.name for p in outdir.iterdir())
            raise SystemExit(f"expected one sdist and one wheel of version {version}, found {names}")
        sdist, wheel = sdists[0], wheels[0]
        # --strict: a README that renders with warnings on PyPI fails here, not at upload time.
        out = run([sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)])
        problems += [line for line in out.splitlines() if WARNING.search(line)]
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            entry_points = zf.read(f"resumekit-{version}.dist-info/entry_points.txt").decode()
        if "resumekit/py.typed" not in names:
            problems.append("the wheel has no resumekit/py.typed (users' type checkers would ignore our hints)")
        if "resumekit = resumekit.cli:main" not in entry_points:
            problems.append("the wheel has no `resumekit` console script")
        with tarfile.open(sdist) as tf:
            if f"resumekit-{version}/src/resumekit/py.typed" not in tf.getnames():
                problems.append("the sdist has no src/resumekit/py.typed")
        if problems:
            print("\n".join(["packaging check failed:", *problems]))
            return 1
        print(f"packaging: {sdist.name} and {wheel.name} built without warnings, twine check --strict passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
