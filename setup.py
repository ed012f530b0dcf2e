"""Build script: metadata lives in pyproject.toml; this file only builds rlkernels._C.

rlkernels._C (the `cuda` backend) is built through CMake (CMakeLists.txt, sources in csrc/)
whenever nvcc is found; it links the CUDA runtime only (no torch), so build isolation never
needs torch. Without nvcc the package installs as pure Python (torch and triton backends).

Environment knobs:
  RLKERNELS_BUILD_CUDA=0|1   0: never build _C. 1: build it, fail if nvcc is missing.
                             Unset: build it when nvcc is found.
  RLKERNELS_CUDA_ARCHS       CMAKE_CUDA_ARCHITECTURES, default "80;90a" (A100, H100/H200).
  MAX_JOBS                   parallel compile jobs (default: number of CPUs).
  CMAKE_GENERATOR            CMake generator (default: Ninja when found, else Unix Makefiles).
  CUDA_HOME / CUDA_PATH      where to look for bin/nvcc when it is not on PATH.
A build failure with nvcc present fails the install (set RLKERNELS_BUILD_CUDA=0 to skip _C).

pip hides a build's output unless it fails or runs with -v; compiling _C takes about 2 minutes,
so the build also writes a one-line notice straight to the terminal when there is one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;90a"


def _log(msg: str) -> None:
    # stderr, flushed: pip shows it with `pip install -v`, and always when the build fails.
    print(f"rlkernels setup: {msg}", file=sys.stderr, flush=True)


BUILD_NOTICE = ("rlkernels: compiling the CUDA extension rlkernels._C with nvcc, about 2 minutes "
                "(pip shows the compiler output with -v; RLKERNELS_BUILD_CUDA=0 skips it)")


def _notice(msg: str, tty: str = "/dev/tty") -> None:
    """``msg`` on the terminal itself, which pip does not capture; on stderr without one."""
    try:
        with open(tty, "w") as f:
            f.write(f"\n{msg}\n")
    except OSError:  # no controlling terminal (CI, Windows)
        _log(msg)


def find_nvcc() -> str | None:
    """nvcc on PATH, else $CUDA_HOME/bin/nvcc ($CUDA_PATH), else /usr/local/cuda/bin/nvcc."""
    found = shutil.which("nvcc")
    if found:
        return found
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in candidates:
        if home:
            nvcc = Path(home) / "bin" / "nvcc"
            if nvcc.is_file() and os.access(nvcc, os.X_OK):
                return str(nvcc)
    return None


def _cuda_build_plan() -> tuple[str | None, str]:
    """(nvcc to build with, or None to skip) and a sentence saying why."""
    flag = os.environ.get("RLKERNELS_BUILD_CUDA", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return None, "RLKERNELS_BUILD_CUDA=0"
    nvcc = find_nvcc()
    if nvcc is None:
        if flag in ("1", "true", "yes", "on"):
            raise RuntimeError(
                "RLKERNELS_BUILD_CUDA=1 but nvcc was not found on PATH, in $CUDA_HOME/bin or "
                "in /usr/local/cuda/bin. Install the CUDA toolkit or unset RLKERNELS_BUILD_CUDA."
            )
        return None, "no nvcc found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)"
    return nvcc, f"nvcc found at {nvcc}"


class CMakeExtension(Extension):
    """An extension built by CMake from the project root (sources are CMake's business)."""

    def __init__(self, name: str, nvcc: str) -> None:
        super().__init__(name, sources=[])
        self.nvcc = nvcc


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt; copy the module to where setuptools expects it.

    setuptools then handles the rest: a regular wheel packs build_lib, and an editable
    install (PEP 660, build_ext.inplace) copies the module next to the sources in rlkernels/.
    """

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        _notice(BUILD_NOTICE)
        try:
            self._build_cmake(ext)
        except Exception as exc:
            raise RuntimeError(
                f"building the CUDA extension {ext.name} failed: {exc}\n"
                "rlkernels: nvcc was found, so the `cuda` backend was expected to build. Fix the "
                "error above, or install without it: RLKERNELS_BUILD_CUDA=0 pip install ..."
            ) from exc

    def _build_cmake(self, ext: CMakeExtension) -> None:
        import pybind11  # a build requirement (pyproject.toml)

        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake (>= 3.24) is not on PATH; `pip install cmake` provides one")
        version_text = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout
        found = re.search(r"(\d+)\.(\d+)", version_text)
        if found and (int(found.group(1)), int(found.group(2))) < (3, 24):
            raise RuntimeError(
                f"{cmake} is version {found.group(0)}; rlkernels needs cmake >= 3.24 (for CUDA "
                "architectures such as 90a); `pip install cmake` provides one"
            )

        dest = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = (Path(self.build_temp) / "cmake").resolve()
        out_dir = build_dir / "out"
        build_dir.mkdir(parents=True, exist_ok=True)

        archs = os.environ.get("RLKERNELS_CUDA_ARCHS", "").strip() or DEFAULT_ARCHS
        generator = os.environ.get("CMAKE_GENERATOR") or (
            "Ninja" if shutil.which("ninja") else "Unix Makefiles"
        )
        jobs = os.environ.get("MAX_JOBS", "").strip() or str(os.cpu_count() or 1)
        config = "Debug" if self.debug else "Release"
        self._drop_stale_cache(build_dir, generator)

        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", generator,
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_CUDA_COMPILER={ext.nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            f"-DRLKERNELS_OUTPUT_DIR={out_dir}",
        ]
        build = [cmake, "--build", str(build_dir), "--config", config, "--parallel", jobs]

        _log(f"building {ext.name} with {ext.nvcc} for CUDA archs {archs} "
             f"({generator}, {jobs} jobs)")
        start = time.perf_counter()
        for cmd in (configure, build):
            _log("$ " + " ".join(cmd))
            subprocess.run(cmd, check=True)

        built = sorted(out_dir.glob("_C.*so")) + sorted(out_dir.glob("_C.*pyd"))
        if not built:
            raise RuntimeError(f"CMake finished but produced no _C module in {out_dir}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(built[0], dest)
        _log(f"built {ext.name} in {time.perf_counter() - start:.1f} s -> {dest}")

    @staticmethod
    def _drop_stale_cache(build_dir: Path, generator: str) -> None:
        # A build dir configured from another source tree or with another generator makes
        # CMake refuse to configure; start it afresh instead.
        cache = build_dir / "CMakeCache.txt"
        if not cache.is_file():
            return
        text = cache.read_text(errors="replace")
        same_src = f"CMAKE_HOME_DIRECTORY:INTERNAL={ROOT}" in text
        same_gen = f"CMAKE_GENERATOR:INTERNAL={generator}" in text
        if not (same_src and same_gen):
            shutil.rmtree(build_dir)
            build_dir.mkdir(parents=True)


def _stale_in_tree_modules() -> list[Path]:
    # Left next to the sources by an earlier editable build (build_ext --inplace).
    package = ROOT / "rlkernels"
    return sorted(package.glob("_C.*.so")) + sorted(package.glob("_C.*.pyd"))


def _extensions() -> list[Extension]:
    nvcc, why = _cuda_build_plan()
    if nvcc is None:
        _log(f"NOT building the CUDA extension rlkernels._C: {why}. Installing pure Python "
             "(torch and triton backends); the `cuda` backend will report itself unavailable. "
             "To build it, reinstall with nvcc on PATH (and RLKERNELS_BUILD_CUDA unset or 1).")
        for stale in _stale_in_tree_modules():
            if why.startswith("RLKERNELS_BUILD_CUDA=0"):
                # An editable install would still import it: honour the explicit opt-out.
                _log(f"removing {stale} from an earlier build")
                stale.unlink()
            else:
                _log(f"warning: {stale} from an earlier build remains and editable installs "
                     "will import it; delete it if it is not wanted")
        return []
    _log(f"will build rlkernels._C: {why}")
    return [CMakeExtension("rlkernels._C", nvcc)]


if __name__ == "__main__":  # pip's build backend runs this file as __main__
    setup(
        ext_modules=_extensions(),
        cmdclass={"build_ext": CMakeBuild},
    )
