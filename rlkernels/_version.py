"""Single source of the package version (read by setup.py, pyproject.toml and CMake)."""

__version__ = "0.1.0"
