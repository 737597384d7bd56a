import subprocess

from conftest import PYTHON


def _modules_after(stmt: str) -> str:
    code = f"import sys; {stmt}; print('torch' in sys.modules)"
    return subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_import_resumekit_does_not_import_torch():
    assert _modules_after("import resumekit") == "False"


def test_layouts_and_format_do_not_import_torch():
    assert _modules_after("import resumekit.layouts, resumekit.format, resumekit.events, resumekit.policy") == "False"


def test_python_dash_m_works():
    out = subprocess.run([PYTHON, "-m", "resumekit", "--version"], capture_output=True, text=True, check=True)
    assert "resumekit" in out.stdout
