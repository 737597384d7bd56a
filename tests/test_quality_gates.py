"""The gates of `make check` catch what they are there for, with the project's own configuration.

Each test plants one defect in a small file in a temporary folder and runs the tool that `make check` runs on it,
configured by this repository's pyproject.toml: a clean twin of the file passes, so a failure is the defect's and not
a broken configuration. Also here: the static facts the gates rely on (py.typed shipped, one version, the lazy
exports of ``resumekit/__init__`` visible to type checkers).
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"

needs_ruff = pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff comes with the dev extra")
needs_mypy = pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy comes with the dev extra")

CLEAN = '''\
"""A small module written the way the project wants it."""

from __future__ import annotations

import os


def size_of(path: str) -> int:
    """Bytes in ``path``."""
    return os.path.getsize(path)
'''


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


def ruff(args: list[str], path: Path) -> subprocess.CompletedProcess[str]:
    # --config: the project's rules, not whatever a pyproject.toml above the temporary folder would say.
    return run([sys.executable, "-m", "ruff", *args, "--config", str(PYPROJECT), "--no-cache", path.name], path.parent)


def mypy(path: Path, module_root: Path) -> subprocess.CompletedProcess[str]:
    cache = module_root / ".mypy_cache"
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(PYPROJECT), "--cache-dir", str(cache), "--no-incremental"]
    return run([*cmd, str(path.relative_to(module_root))], module_root)


@needs_ruff
def test_lint_passes_the_clean_file_and_fails_on_an_unused_import(tmp_path: Path) -> None:
    good = tmp_path / "good.py"
    good.write_text(CLEAN)
    assert ruff(["check"], good).returncode == 0, ruff(["check"], good).stdout
    bad = tmp_path / "bad.py"
    bad.write_text(CLEAN.replace("import os\n", "import os\nimport json\n"))
    proc = ruff(["check"], bad)
    assert proc.returncode == 1
    assert "F401" in proc.stdout and "`json` imported but unused" in proc.stdout


@needs_ruff
def test_lint_fails_on_a_bug_pattern_beyond_pyflakes(tmp_path: Path) -> None:
    # bugbear: a mutable default argument is shared by every call.
    bad = tmp_path / "bad.py"
    bad.write_text(CLEAN + "\n\ndef remember(x: int, seen: list[int] = []) -> list[int]:\n    return seen\n")
    proc = ruff(["check"], bad)
    assert proc.returncode == 1
    assert "B006" in proc.stdout


@needs_ruff
def test_format_check_passes_the_clean_file_and_fails_on_an_unformatted_one(tmp_path: Path) -> None:
    good = tmp_path / "good.py"
    good.write_text(CLEAN)
    assert ruff(["format", "--check"], good).returncode == 0
    bad = tmp_path / "bad.py"
    bad.write_text(CLEAN.replace("return os.path.getsize(path)", "return os.path.getsize( path )"))
    proc = ruff(["format", "--check"], bad)
    assert proc.returncode == 1
    assert "1 file would be reformatted" in proc.stdout and "bad.py" in proc.stdout


@needs_mypy
def test_types_pass_the_clean_file_and_fail_on_a_type_error(tmp_path: Path) -> None:
    good = tmp_path / "good.py"
    good.write_text(CLEAN)
    proc = mypy(good, tmp_path)
    assert proc.returncode == 0, proc.stdout
    bad = tmp_path / "bad.py"
    bad.write_text(CLEAN + '\n\ndef label(path: str) -> str:\n    return size_of(path) + " bytes"\n')
    proc = mypy(bad, tmp_path)
    assert proc.returncode == 1
    assert 'bad.py:14: error: Unsupported operand types for + ("int" and "str")  [operator]' in proc.stdout


@needs_mypy
def test_the_public_api_is_strict_and_the_rest_is_not(tmp_path: Path) -> None:
    # The same unannotated function: an error in a public-API module (resumekit.cli), accepted in an internal one.
    pkg = tmp_path / "resumekit"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    untyped = CLEAN + "\n\ndef helper(path):\n    return size_of(path)\n"
    (pkg / "cli.py").write_text(untyped)
    (pkg / "units.py").write_text(untyped)
    proc = mypy(pkg / "cli.py", tmp_path)
    assert proc.returncode == 1
    assert "cli.py:13: error: Function is missing a type annotation  [no-untyped-def]" in proc.stdout
    proc = mypy(pkg / "units.py", tmp_path)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.skipif(not (ROOT / "Makefile").is_file(), reason="a checkout's file; the sdist has no Makefile")
def test_the_gates_are_wired_into_make_check_and_ci() -> None:
    makefile = (ROOT / "Makefile").read_text()
    check = makefile[makefile.index("\ncheck:") :]
    for gate in ("lint", "format-check", "types", "package"):
        assert gate in check.split("\n\n")[0], f"`make check` does not run {gate}"
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make check" in ci and "make test" in ci, ".ci/run must run `make check` and `make test`"
    assert ci.index("make check") < ci.index("make test"), ".ci/run must run `make check` before `make test`"
    dev = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["dev"]
    for tool in ("ruff", "mypy", "build", "twine", "setuptools"):
        assert any(req.startswith(tool) for req in dev), f"`make check` needs {tool}: add it to the dev extra"


def test_py_typed_is_shipped_and_the_version_is_written_once() -> None:
    config = tomllib.loads(PYPROJECT.read_text())
    assert (ROOT / "src" / "resumekit" / "py.typed").is_file()
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["resumekit"]
    assert "version" not in config["project"] and "version" in config["project"]["dynamic"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "resumekit.__version__"}


def test_every_lazy_export_is_in_all_and_visible_to_type_checkers() -> None:
    # `resumekit/__init__` resolves its exports lazily (no torch on import); a type checker cannot follow
    # `__getattr__`, so each export is also imported under TYPE_CHECKING and listed in a literal __all__.
    tree = ast.parse((ROOT / "src" / "resumekit" / "__init__.py").read_text())
    exports: dict[str, str] = {}
    all_names: list[str] = []
    typed: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            name = getattr(target, "id", None)
            if name == "_EXPORTS":
                exports = ast.literal_eval(node.value)
            elif name == "__all__":
                all_names = ast.literal_eval(node.value)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for imp in ast.walk(node):
                if isinstance(imp, ast.ImportFrom):
                    typed.update({a.asname or a.name: (imp.module or "") for a in imp.names})
    assert exports, "no _EXPORTS dict in resumekit/__init__.py"
    assert sorted(all_names) == sorted([*exports, "__version__"]), "__all__ and _EXPORTS name different sets"
    assert typed == exports, "the TYPE_CHECKING imports and _EXPORTS disagree (name -> module)"
