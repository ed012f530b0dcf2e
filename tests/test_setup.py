"""setup.py's build notice: compiling rlkernels._C takes minutes and pip hides build output
without -v, so the build says so on the terminal itself."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_py():
    """setup.py imported as a module (its setup() call only runs as __main__)."""
    spec = importlib.util.spec_from_file_location("rlkernels_setup_py",
                                                  os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notice_goes_to_the_terminal(setup_py, tmp_path, capsys):
    tty = tmp_path / "tty"
    tty.touch()
    setup_py._notice(setup_py.BUILD_NOTICE, tty=str(tty))
    assert tty.read_text() == f"\n{setup_py.BUILD_NOTICE}\n"
    assert capsys.readouterr().err == ""
    assert "about 2 minutes" in setup_py.BUILD_NOTICE and "-v" in setup_py.BUILD_NOTICE


def test_notice_without_a_terminal_goes_to_stderr(setup_py, tmp_path, capsys):
    setup_py._notice("hello", tty=str(tmp_path / "no" / "tty"))
    assert capsys.readouterr().err == "rlkernels setup: hello\n"


def test_building_the_extension_starts_with_the_notice(setup_py, monkeypatch):
    from setuptools import Distribution
    said, built = [], []
    monkeypatch.setattr(setup_py, "_notice", said.append)
    monkeypatch.setattr(setup_py.CMakeBuild, "_build_cmake",
                        lambda self, ext: built.append(said[:]))
    cmd = setup_py.CMakeBuild(Distribution())
    cmd.build_extension(setup_py.CMakeExtension("rlkernels._C", "/usr/bin/nvcc"))
    assert built == [[setup_py.BUILD_NOTICE]]


def test_setup_py_still_runs_as_a_script(tmp_path):
    """As pip's backend runs it (``__name__ == "__main__"``), on a copy of the metadata: a run
    in the checkout with RLKERNELS_BUILD_CUDA=0 would delete its built rlkernels/_C*.so."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    (tmp_path / "rlkernels").mkdir()
    shutil.copy(os.path.join(ROOT, "rlkernels", "_version.py"), tmp_path / "rlkernels")
    (tmp_path / "rlkernels" / "__init__.py").touch()
    out = subprocess.run([sys.executable, "setup.py", "--name"], cwd=tmp_path,
                         capture_output=True, text=True,
                         env=dict(os.environ, RLKERNELS_BUILD_CUDA="0"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "rlkernels"
