"""Backend registry: which implementations exist, which are usable here, which one runs.

Three backends implement the same private kernel functions, one module per op family:

* ``torch``  -> ``rlkernels.reference.<family>`` (always available, the ground truth)
* ``triton`` -> ``rlkernels.triton.<family>``
* ``cuda``   -> ``rlkernels.cuda.<family>`` (launchers for ``rlkernels._C``)

A public op resolves its ``backend=`` argument once, in Python, to a concrete name that is
then passed to the custom op as a string, so ``torch.compile`` sees a constant.
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache
from types import ModuleType
from typing import Dict, Optional

import torch

BACKENDS = ("torch", "triton", "cuda")
_PACKAGES = {"torch": "rlkernels.reference", "triton": "rlkernels.triton",
             "cuda": "rlkernels.cuda"}


def _load_auto_table() -> Dict[tuple, str]:
    """Fastest backend per ``(op, device type)``: ``rlkernels/_auto_table.py``, which
    ``benchmarks/gpu_ingest.py`` writes from the committed benchmark results
    (benchmarks/results/). Empty while no GPU run has measured anything: "no benchmark, no
    claim" (``auto`` then takes triton, then cuda, on GPUs and torch elsewhere)."""
    try:
        from rlkernels._auto_table import TABLE
    except ModuleNotFoundError as exc:
        if exc.name == "rlkernels._auto_table":
            return {}
        raise
    return {key: name for key, name in TABLE.items() if name in BACKENDS}


_AUTO_TABLE: Dict[tuple, str] = _load_auto_table()

_default: Optional[str] = None
# _resolve's answers by (backend argument, default, env, family, op, device type); cleared
# by set_backend. Errors are raised again each call, never cached.
_RESOLVED: Dict[tuple, str] = {}
# backend modules by (backend, family): import_module costs microseconds per call; functions
# are still looked up on the module at each call (so a patched function is seen)
_MODULES: Dict[tuple, Optional[ModuleType]] = {}


def _triton_status() -> str:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return "ok"
    return "triton is installed but no GPU is visible and TRITON_INTERPRET=1 is not set"


def _cuda_status() -> str:
    try:
        from rlkernels.cuda import cuda_status
    except Exception as exc:
        return f"rlkernels.cuda failed to import ({type(exc).__name__}: {exc})"
    return cuda_status()


@lru_cache(maxsize=None)
def _status(name: str) -> str:
    if name == "torch":
        return "ok"
    if name == "triton":
        return _triton_status()
    return _cuda_status()


def available_backends() -> Dict[str, str]:
    """Map each backend name to ``"ok"`` or the reason it cannot be used in this process."""
    return {name: _status(name) for name in BACKENDS}


def _check_name(name, argument: str = "backend", allow_auto: bool = True) -> str:
    options = BACKENDS + (("auto",) if allow_auto else ())
    if not isinstance(name, str) or name not in options:
        raise ValueError(f"{argument}: expected one of {', '.join(map(repr, options))}, "
                         f"got {name!r}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide default backend (``None`` restores ``RLKERNELS_BACKEND`` or
    ``"auto"``). An explicit backend that is unavailable raises ``RuntimeError`` now, not at
    the first op."""
    global _default
    if name is not None:
        _check_name(name)
        if name != "auto" and _status(name) != "ok":
            raise RuntimeError(f"backend {name!r} is not available: {_status(name)}")
    _default = name
    _RESOLVED.clear()


def get_backend() -> str:
    """The process default: ``set_backend``, else ``RLKERNELS_BACKEND``, else ``"auto"``."""
    if _default is not None:
        return _default
    env = os.environ.get("RLKERNELS_BACKEND", "").strip()
    if env:
        return _check_name(env, "RLKERNELS_BACKEND")
    return "auto"


def _module(name: str, family: str) -> Optional[ModuleType]:
    key = (name, family)
    if key in _MODULES:
        return _MODULES[key]
    try:
        mod = importlib.import_module(f"{_PACKAGES[name]}.{family}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith(_PACKAGES[name]):
            mod = None  # the backend has no kernels for this family (yet)
        else:
            raise
    _MODULES[key] = mod
    return mod


def _op(op: str):
    # the op table fills itself when rlkernels.ops is imported (rlkernels/__init__ does)
    from rlkernels.ops._table import OPS
    return OPS.get(op)


def implements(name: str, *key: str, parallel: bool = False) -> bool:
    """Whether backend ``name`` is available and declares kernels for op ``key`` in the op
    table (:mod:`rlkernels.ops._table`); with ``parallel``, for its vocabulary-parallel form
    (``process_group=``). ``key`` is the op name; the older ``(family, op)`` form is
    accepted too."""
    if len(key) not in (1, 2):
        raise TypeError(f"implements: expected (name, op), got {len(key) + 1} arguments")
    spec = _op(key[-1])
    if spec is None or _status(name) != "ok":
        return False
    return spec.implemented_by(name, parallel)


def resolve(backend: Optional[str], op: str, device: torch.device,
            parallel: bool = False) -> str:
    """Turn the ``backend=`` argument into the concrete backend that runs ``op`` (in its
    vocabulary-parallel form with ``parallel``).

    Under ``torch.compile`` the answer is computed once at trace time and baked into the
    graph as a constant (Dynamo cannot trace the imports below): a later ``set_backend``
    does not retrace a function that was already compiled.
    """
    return _resolve(backend, op, device.type, parallel)


def _environ_reader():
    """``(get, data, key)``: ``get(name)`` the raw value of an environment variable as
    ``os.environ`` holds it (encoded; None when unset), one dict lookup instead of
    ``os.environ.get``'s encode and decode (~1 us each here, twice per op call); ``data``
    and ``key(name)`` for a caller that inlines the lookup (``data`` None: not CPython's
    ``os._Environ``, use ``get``). Sees every change made through ``os.environ``
    (``monkeypatch.setenv`` included), as ``os.environ.get`` does."""
    data, encode = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    if not isinstance(data, dict) or encode is None:  # not CPython's os._Environ
        return os.environ.get, None, None
    keys = {}

    def get(name: str):
        key = keys.get(name)
        if key is None:
            key = keys[name] = encode(name)
        return data.get(key)

    return get, data, encode


_env, _ENV_DATA, _env_key = _environ_reader()
_KEY_BACKEND = _env_key("RLKERNELS_BACKEND") if _ENV_DATA is not None else None
_KEY_INTERPRET = _env_key("TRITON_INTERPRET") if _ENV_DATA is not None else None


@torch.compiler.assume_constant_result
def _resolve(backend: Optional[str], op: str, device_type: str, parallel: bool) -> str:
    # everything the answer depends on that can change while the process runs (the raw
    # environment values are part of the key only)
    if _ENV_DATA is not None:
        env = _ENV_DATA.get(_KEY_BACKEND), _ENV_DATA.get(_KEY_INTERPRET)
    else:
        env = _env("RLKERNELS_BACKEND"), _env("TRITON_INTERPRET")
    key = (backend, _default, env, id(_AUTO_TABLE), op, device_type, parallel)
    name = _RESOLVED.get(key)
    if name is None:
        name = _RESOLVED[key] = _resolve_uncached(backend, op, device_type, parallel)
    return name


def _resolve_uncached(backend: Optional[str], op: str, device_type: str,
                      parallel: bool) -> str:
    name = get_backend() if backend is None else _check_name(backend)
    form = " with a process_group" if parallel else ""
    if name == "auto":
        preferred = _AUTO_TABLE.get((op, device_type))
        candidates = [preferred] if preferred else []
        if device_type == "cuda":
            candidates += ["triton", "cuda"]
        for cand in candidates:
            if implements(cand, op, parallel=parallel):
                return cand
        return "torch"
    if _status(name) != "ok":
        raise RuntimeError(f"backend {name!r} is not available: {_status(name)}")
    if not implements(name, op, parallel=parallel):
        raise RuntimeError(f"backend {name!r} has no implementation of {op}{form}; "
                           f"use backend='torch' or 'auto'")
    if name == "triton" and device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend 'triton' got CPU tensors: Triton kernels run on GPUs, or on "
                           "CPU only under TRITON_INTERPRET=1 (tests)")
    if name == "cuda" and device_type != "cuda":
        raise RuntimeError(f"backend 'cuda' needs CUDA tensors, got tensors on {device_type}")
    return name


def kernel(name: str, family: str, fn: str):
    """The function ``fn`` of backend ``name`` for op family ``family``."""
    mod = _module(name, family)
    if mod is None or not hasattr(mod, fn):
        raise RuntimeError(f"backend {name!r} has no kernel {family}.{fn}")
    return getattr(mod, fn)
