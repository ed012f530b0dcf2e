"""Compile every Triton kernel rlkernels launches for a real GPU target, on a machine without one.

Why: the CPU tests run the kernels in Triton's interpreter, which accepts code the real compiler
rejects (``tl.dot`` shape / dtype rules, layouts, constexpr misuse) and says nothing about shared
memory or registers. Triton can compile ahead of time for ``GPUTarget("cuda", 90, 32)`` here,
and its bundled ``ptxas -v`` reports registers and spills, so this script does, per kernel
configuration the launchers would use on an H100 / H200 at realistic shapes: compile OK?,
shared memory bytes (metadata.shared, against the per-block limit), registers per thread and
spill bytes. These are compiler outputs, not measurements.

How:

1. **Capture without running.** With ``TRITON_INTERPRET`` unset, ``@triton.jit`` gives
   ``triton.runtime.jit.JITFunction`` objects; :func:`capture` replaces ``JITFunction.run`` (the
   method ``kernel[grid](...)`` calls) by one that binds the arguments exactly as Triton's JIT
   does for the chosen target (``create_function_from_signature`` + ``JITFunction._pack_args``:
   ``*bf16`` pointers, ``i32`` / ``i64`` ints by range, ints equal to 1 as constexpr, the
   divisibility-16 attributes, ``num_warps`` / ``num_stages`` options), records that and
   returns without launching.
2. **Launch on GPU-like meta tensors.** The launchers of ``rlkernels/triton/*.py`` are called
   (forward and backward) on ``device="meta"`` tensors (no memory, nothing runs) of a subclass
   whose ``is_cuda`` is True, so every launcher takes its GPU branch (``linear._blocks`` picks
   its GPU tiles and ``UPCAST=False``; ``policy`` uses libdevice). Patched for the duration of
   the capture only: ``torch.cuda.device`` (a no-op context: the launchers' device guards) and
   ``torch.cuda.get_device_properties`` (132 SMs, an H100 SXM / H200; only sizes some grids).
3. **Compile** each distinct (kernel, signature, constexprs, attributes, options) with
   ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` in a process pool,
   then run Triton's bundled ``ptxas -v`` on the PTX with the flags Triton itself uses.

Usage: ``python benchmarks/sm90_compile.py [--arch 90 [80]] [--quick] [--out FILE.md|.csv]
[--json FILE]``. Exit status 1 on any compile failure, any spill, shared memory over the
limit, or a launched kernel that no case captured.

Triton internals used (may move between Triton versions; checked on 3.9.0):
``triton.runtime.jit.JITFunction.run`` / ``._pack_args`` / ``.params`` / ``.signature`` /
``.debug``, ``triton.runtime.jit.create_function_from_signature``,
``triton.compiler.make_backend``, ``triton.backends.nvidia.compiler.get_ptxas`` and
``sm_arch_from_capability``, ``CompiledKernel.asm["ptx"]`` and ``.metadata.shared``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Tuple

# Real JITFunctions, not the interpreter's wrappers: this must happen before triton is imported.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import (JITFunction, KernelInterface,  # noqa: E402
                                create_function_from_signature)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Largest dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {90: 232448, 80: 166912, 89: 101376, 86: 101376}
GPU_SMS = 132  # H100 SXM and H200


# ============================================================================ capture

class GpuMeta(torch.Tensor):
    """A ``device="meta"`` tensor that answers ``is_cuda`` with True, so the launchers take
    their GPU branches; everything else (shapes, strides, dtypes) is an ordinary meta tensor,
    and results of torch ops on it stay ``GpuMeta``."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func == torch.Tensor.is_cuda.__get__:
            return True
        return super().__torch_function__(func, types, args, kwargs or {})


def gpu(*shape, dtype=torch.float32) -> torch.Tensor:
    """A contiguous GPU-like meta tensor."""
    return torch.empty(shape, dtype=dtype, device="meta").as_subclass(GpuMeta)


@dataclass
class Launch:
    """One captured ``kernel[grid](...)`` call, bound as Triton's JIT binds it."""
    kernel: str
    fn: JITFunction
    signature: Dict[str, str]
    constexprs: dict
    attrs: dict
    options: object
    grid: tuple
    case: str = ""

    def key(self) -> str:
        return repr((self.fn.fn.__module__, self.kernel, self.signature, self.constexprs,
                     self.attrs, self.options))

    def config(self) -> str:
        """Readable summary: the pointer dtypes, the declared constexprs, warps and stages."""
        ptrs = sorted({v[1:] for v in self.signature.values() if v.startswith("*")})
        parts = ["ptr=" + "/".join(ptrs)] if ptrs else []
        names = list(self.signature)
        for path, value in self.constexprs.items():
            # float hyper-parameters are left out of the summary (not out of the key)
            if self.fn.params[path[0]].is_constexpr and not isinstance(value, float):
                parts.append(f"{names[path[0]]}={_short(value)}")
        parts.append(f"w{self.options.num_warps}s{self.options.num_stages}")
        return " ".join(parts)


def _short(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, triton.language.dtype):
        return str(value).replace("triton.language.", "")
    return str(value)


@contextlib.contextmanager
def capture(arch: int, records: List[Launch]):
    """Within the block, ``kernel[grid](...)`` appends a :class:`Launch` to ``records`` instead
    of running (see the module docstring for what is patched)."""
    if triton.knobs.runtime.interpret:
        raise RuntimeError("needs real JITFunctions: import this module without "
                           "TRITON_INTERPRET=1 (run it as a script or in a subprocess)")
    if not gpu(1).is_cuda:
        raise RuntimeError("GpuMeta.is_cuda is not True: torch no longer routes the is_cuda "
                           "getter through __torch_function__; the launchers would take their "
                           "CPU branches")
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binders: dict = {}
    knobs = triton.knobs

    def run(self, *args, grid, warmup, **kwargs):
        # the options JITFunction.run adds before binding (triton 3.9)
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
            if hasattr(knobs.compilation, name):
                kwargs[name] = getattr(knobs.compilation, name)
        if id(self) not in binders:
            binders[id(self)] = create_function_from_signature(self.signature, self.params,
                                                               backend)
        bound, spec, opts = binders[id(self)](*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, spec,
                                                                opts)
        grid = grid(bound) if callable(grid) else tuple(grid)
        records.append(Launch(self.__name__, self, signature, constexprs, attrs, options, grid))
        return None

    saved = (JITFunction.run, torch.cuda.device, torch.cuda.get_device_properties)
    JITFunction.run = run
    torch.cuda.device = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.get_device_properties = lambda *a, **k: SimpleNamespace(
        multi_processor_count=GPU_SMS)
    try:
        yield records
    finally:
        JITFunction.run, torch.cuda.device, torch.cuda.get_device_properties = saved


# ============================================================================== cases
# Each case calls the launchers of one op family, forward and backward, on GPU-like tensors of a
# realistic shape. A case is (label, callable); the quick set (the test) keeps one shape per
# family but every flag combination, so that every kernel and constexpr family is compiled.

def vocab_cases(n: int, v: int, dtype: torch.dtype):
    from rlkernels.triton import vocab as K

    def run():
        x, ref = gpu(n, v, dtype=dtype), gpu(n, v, dtype=dtype)
        tok, mask = gpu(n, dtype=torch.int64), gpu(n, dtype=torch.bool)
        for tokens, ent in ((tok, False), (tok, True), (None, True)):
            lp, h, st = K.token_logprobs_forward(x, tokens, 0.7, -100, ent)
            for glp, gh in ((lp, None), (lp, h), (None, h)):
                if tokens is None and glp is not None:
                    continue
                if not ent and gh is not None:
                    continue
                K.token_logprobs_backward(glp, gh, x, tokens, st, 0.7, -100)
        # "alpha" / "tv" run the kernels of triton/_divergence.py (beta carries alpha)
        for kind, beta in (("reverse", 0.5), ("forward", 0.5), ("jsd", 0.5), ("alpha", 0.3),
                           ("tv", 0.5)):
            for m in (None, mask):
                kl, sp, sq = K.kl_divergence_forward(x, ref, m, kind, beta, 1.0)
                K.kl_divergence_partial_forward(x, ref, m, sp, sq, kind, beta, 1.0)
                for need_ref in (False, True):
                    K.kl_divergence_backward(kl, x, ref, m, sp, sq, kind, beta, 1.0, need_ref)
    return [(f"vocab N={n} V={v} {_dt(dtype)}", run)]


def sparse_cases(n: int, v: int, k: int, dtype: torch.dtype):
    from rlkernels.triton import sparse as K

    def run():
        x, idx = gpu(n, v, dtype=dtype), gpu(n, k, dtype=torch.int64)
        tgt = gpu(n, k, dtype=torch.float32)
        for norm in ("full", "support"):
            for tail in (False, True):
                lp, t, st = K.sparse_logprobs_forward(x, idx, 0.7, norm, tail)
                K.sparse_logprobs_backward(lp, t if tail else None, x, idx, lp, t, st, 0.7, norm)
        for tail in (False, True):
            kl, t, st = K.sparse_kl_forward(x, idx, tgt, 0.7, tail)
            K.sparse_kl_backward(kl, x, idx, tgt, t, st, 0.7, tail)
        # CSR supports (issue 21): K ids a row on average, as flat [nnz] arrays
        ids, off = gpu(n * k, dtype=torch.int64), gpu(n + 1, dtype=torch.int64)
        tgt1 = gpu(n * k, dtype=torch.float32)
        for norm in ("full", "support"):
            for tail in (False, True):
                lp, t, st = K.sparse_logprobs_forward(x, ids, 0.7, norm, tail, off)
                K.sparse_logprobs_backward(lp, t if tail else None, x, ids, lp, t, st, 0.7, norm,
                                           off)
        for tail in (False, True):
            kl, t, st = K.sparse_kl_forward(x, ids, tgt1, 0.7, tail, off)
            K.sparse_kl_backward(kl, x, ids, tgt1, t, st, 0.7, tail, off)
    return [(f"sparse N={n} V={v} K={k} {_dt(dtype)}", run)]


def advantage_cases(b: int, group_size: int, dtype: torch.dtype, t: int = 4096):
    """``group_advantages`` on ``[b]`` rewards; ``gae``, ``discounted_returns`` and
    ``masked_whiten`` on ``[b, t]`` when the module has them (they are new)."""
    from rlkernels.triton import advantage as K

    def run():
        r, gid = gpu(b, dtype=dtype), gpu(b, dtype=torch.int64)
        for method in ("grpo", "dr_grpo", "rloo", "batch_std"):
            for unbiased in (False, True):
                for index in (None, gid):
                    K.group_advantages_forward(r, index, group_size, method, 1e-6, unbiased)
        rt, vt, mt = gpu(b, t, dtype=dtype), gpu(b, t, dtype=dtype), gpu(b, t, dtype=torch.bool)
        if hasattr(K, "gae_forward"):
            K.gae_forward(rt, vt, mt, 0.99, 0.95)
        if hasattr(K, "discounted_returns_forward"):
            K.discounted_returns_forward(rt, mt, 0.99)
        if hasattr(K, "masked_whiten_forward"):
            for shift in (False, True):
                for unbiased in (False, True):
                    out, st = K.masked_whiten_forward(vt, mt, shift, 1e-8, unbiased)
                    K.masked_whiten_backward(out, vt, mt, st, shift, unbiased)
        # verl's estimators (issue 21): the group methods that read the response mask, the
        # multi-component gdpo, and the ReMax / REINFORCE++ returns (with the batch whitening)
        for method in ("opo", "gpg", "grpo_passk", "reinforce_plus_plus_baseline"):
            for index in (None, gid):
                K.group_advantages_forward(r, index, group_size, method, 1e-6, True, mask=mt)
        comps = gpu(b, 3, dtype=dtype)
        K.group_advantages_forward(comps, None, group_size, "gdpo", 1e-6, True, mask=mt,
                                   reward_weights=gpu(3, dtype=dtype))
        for baseline, whiten in ((gpu(b, dtype=dtype), False), (None, True)):
            K.discounted_advantages_forward(rt, mt, baseline, 0.99, whiten, 1e-8, True)
    return [(f"advantage B={b} S={group_size} T={t} {_dt(dtype)}", run)]


def _policy_options():
    """Named settings that between them take every value of every policy constexpr."""
    from rlkernels._policy_options import PolicyOptions as O
    return {
        "grpo": O(),
        "dapo+ent": O(clip_high=0.28, entropy_coef=0.01),
        "gspo": O(clip_low=3e-4, clip_high=4e-4, ratio_level="sequence",
                  agg="seq-mean-token-mean"),
        "cispo+k1": O(loss="cispo", clip_low=10.0, clip_high=0.28, kl_coef=0.01,
                      kl_estimator="k1"),
        "reinforce+abs": O(loss="reinforce", agg="seq-mean-token-sum", kl_coef=0.01,
                           kl_estimator="abs"),
        "dr_grpo+k2": O(agg="seq-mean-token-sum-norm", kl_coef=0.01, kl_estimator="k2"),
        "ppo-dual-delta+k3+": O(dual_clip=3.0, delta=1.5, kl_coef=0.04, kl_estimator="k3+",
                                entropy_coef=0.01),
        "ppo+k3": O(kl_coef=0.04, kl_estimator="k3"),
    }


def policy_cases(b: int, t: int, dtype: torch.dtype, names=None):
    from rlkernels.triton import policy as K
    opts = _policy_options()

    def run():
        lp, old, ref, ent, w = (gpu(b, t, dtype=dtype) for _ in range(5))
        adv, adv_bt = gpu(b, dtype=dtype), gpu(b, t, dtype=dtype)
        mask = gpu(b, t, dtype=torch.bool)
        norm = gpu(dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        for i, name in enumerate(names or opts):
            o = opts[name]
            # vary the optional inputs with the settings so that every flag takes both values
            use_ref = o.kl_coef != 0.0 or i % 3 == 0
            args = (lp, old, adv_bt if i % 2 else adv, mask,
                    norm if o.agg == "seq-mean-token-sum-norm" or i == 0 else None,
                    ref if use_ref else None, ent if o.entropy_coef or i % 4 == 1 else None,
                    w if i % 3 == 1 else None, o)
            loss, _ = K.policy_loss_forward(*args)
            K.policy_loss_backward(loss, *args)
    return [(f"policy B={b} T={t} {_dt(dtype)}", run)]


def grpo_cases(b: int, t: int, v: int, dtype: torch.dtype):
    """``grpo_loss``: the vocabulary kernels composed with the policy kernels."""
    from rlkernels._policy_options import PolicyOptions
    from rlkernels.triton import policy as K

    def run():
        logits, tok = gpu(b * t, v, dtype=dtype), gpu(b, t, dtype=torch.int64)
        old, adv, mask = gpu(b, t), gpu(b), gpu(b, t, dtype=torch.bool)
        o = PolicyOptions(entropy_coef=0.01)
        loss, _, lp, ent, st = K.grpo_loss_forward(logits, tok, old, adv, mask, None, None,
                                                   None, 1.0, o)
        K.grpo_loss_backward(loss, logits, tok, old, adv, mask, None, None, None, lp, ent, st,
                             1.0, o, True)
    return [(f"grpo_loss B={b} T={t} V={v} {_dt(dtype)}", run)] + gif_cases(b * t, v, dtype)


def gif_cases(n: int, v: int, dtype: torch.dtype):
    """``grpo_loss(grad_in_forward=True)``'s backward: the gradient formed in the forward,
    scaled by the upstream scalar (issue 22)."""
    from rlkernels.triton import grpo as G

    def run():
        G.grpo_loss_gif_scale_(gpu(n, v, dtype=dtype), gpu(1))
    return [(f"grpo_loss_gif_scale N={n} V={v} {_dt(dtype)}", run)]


def linear_cases(n: int, h: int, v: int, dtype: torch.dtype, grpo: bool = False):
    from rlkernels._policy_options import PolicyOptions
    from rlkernels.triton import linear as K

    def run():
        hid, w, bias = gpu(n, h, dtype=dtype), gpu(v, h, dtype=dtype), gpu(v, dtype=dtype)
        tok = gpu(n, dtype=torch.int64)
        for b in (None, bias):
            for ent in (False, True):
                lp, e, st = K.linear_token_logprobs_forward(hid, w, b, tok, 1.0, -100, ent)
                for glp, gh in ((lp, None), (lp, e) if ent else (None, None), (None, e)):
                    if glp is None and (gh is None or not ent):
                        continue
                    K.linear_token_logprobs_backward(glp, gh, hid, w, b, tok, st, 1.0, -100)
        if grpo:
            bt = (n // 4096, 4096)
            tok2, old, adv = gpu(*bt, dtype=torch.int64), gpu(*bt), gpu(bt[0])
            mask, o = gpu(*bt, dtype=torch.bool), PolicyOptions(entropy_coef=0.01)
            loss, _, lp, e, st = K.linear_grpo_loss_forward(hid, w, None, tok2, old, adv, mask,
                                                            None, None, None, 1.0, o)
            K.linear_grpo_loss_backward(loss, hid, w, None, tok2, old, adv, mask, None, None,
                                        None, lp, e, st, 1.0, o)
    return [(f"linear N={n} H={h} V={v} {_dt(dtype)}", run)]


def rollout_cases(b: int, t: int, dtype: torch.dtype):
    """``rollout_correction``: every level and mode; no criterion, the token and sequence
    criteria, and opsm with ``[B]`` advantages (the constexpr bit mask takes those values)."""
    from rlkernels.ops.rollout import _options
    from rlkernels.triton import rollout as K

    def run():
        old, roll, mask = gpu(b, t, dtype=dtype), gpu(b, t, dtype=dtype), gpu(
            b, t, dtype=torch.bool)
        adv = gpu(b, dtype=dtype)
        rejects = ((None, None), ("token_k1,token_k2,token_k3", 1.5),
                   ("seq_sum_k1,seq_sum_k2,seq_sum_k3,seq_mean_k1,seq_mean_k2,seq_mean_k3,"
                    "seq_max_k2,seq_max_k3", 2.0), ("opsm", 0.0))
        for level in ("token", "sequence", "geometric"):
            for mode in ("truncate", "mask"):
                for rej, thr in rejects:
                    o = _options(level, mode, 2.0, 0.5, rej, thr)
                    K.rollout_correction_forward(old, roll, mask, adv, o.level, o.mode,
                                                 o.reject, o.nums)
    return [(f"rollout B={b} T={t} {_dt(dtype)}", run)]


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace(
        "float", "fp")


def all_cases(quick: bool):
    """The launch cases: ``quick`` is one shape per family (every kernel and flag family);
    the full set adds the other vocabularies, K, H, dtypes and the fp64 paths."""
    bf16, fp32, fp64 = torch.bfloat16, torch.float32, torch.float64
    n, v = 16384, 151936
    if quick:
        return (vocab_cases(n, v, bf16) + sparse_cases(n, v, 20, bf16)
                + advantage_cases(512, 8, fp32) + policy_cases(512, 4096, fp32)
                + linear_cases(n, 4096, v, bf16) + rollout_cases(512, 4096, fp32)
                + gif_cases(n, v, bf16))
    cases = []
    for dtype in (bf16, fp32):
        for vocab in (v, 32000, 128256):
            cases += vocab_cases(n, vocab, dtype)
        for k in (20, 256):
            cases += sparse_cases(n, v, k, dtype)
    cases += vocab_cases(n, v, fp64) + sparse_cases(n, v, 20, fp64)
    for dtype in (fp32, fp64):
        cases += advantage_cases(512, 8, dtype) + advantage_cases(512 * 8, 16, dtype, t=512)
        cases += policy_cases(512, 4096, dtype)
    cases += policy_cases(512, 4096, bf16, names=["grpo", "gspo"])
    cases += policy_cases(4096, 512, fp32, names=["grpo", "gspo"])  # ROWS > 1 tiles
    cases += grpo_cases(4, 4096, v, bf16)
    cases += rollout_cases(512, 4096, fp32) + rollout_cases(512, 4096, bf16)
    cases += rollout_cases(512, 4096, fp64) + rollout_cases(4096, 64, fp32)  # ROWS > 1
    for h in (2048, 3584, 4096):
        cases += linear_cases(n, h, v, bf16, grpo=h == 4096)
    cases += linear_cases(n, 4096, v, fp32) + linear_cases(n, 4096, v, fp64)
    cases += linear_cases(n, 4096, v, torch.float16)
    return cases


def capture_launches(cases, arch: int) -> Tuple[Dict[str, Launch], List[str]]:
    """Run every case under :func:`capture`: the distinct launches by key (the first case that
    produced each one names it), and the errors of cases that raised (a launcher whose
    signature changed, say), which count as failures."""
    records: List[Launch] = []
    distinct: Dict[str, Launch] = {}
    errors = []
    with capture(arch, records), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, run in cases:
            start = len(records)
            try:
                run()
            except Exception as exc:  # noqa: BLE001 -- reported, and the exit status is 1
                errors.append(f"{label}: {type(exc).__name__}: {exc}")
            for rec in records[start:]:
                rec.case = label
                distinct.setdefault(rec.key(), rec)
    return distinct, errors


# ============================================================================== compile

@dataclass
class Result:
    kernel: str
    config: str
    case: str
    arch: int
    grid: str = ""
    ok: bool = False
    error: str = ""
    regs: int = -1
    spill_store: int = -1
    spill_load: int = -1
    stack: int = -1
    shared: int = -1
    seconds: float = 0.0
    flags: List[str] = field(default_factory=list)


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_store": re.compile(r"(\d+) bytes spill stores"),
    "spill_load": re.compile(r"(\d+) bytes spill loads"),
}


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers, stack and spill bytes from Triton's bundled ``ptxas -v``, run with the flags
    Triton uses for its own cubin (``-lineinfo``, ``--regAllocOptLevel=2``)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(src) + ".o"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    return {k: int(r.search(log).group(1)) for k, r in _PTXAS_RE.items()}


def compile_launch(launch: Launch, arch: int) -> Result:
    """Compile one launch for ``sm_<arch>`` and collect its resource usage and the flags
    (spills, shared memory over the limit)."""
    res = Result(launch.kernel, launch.config(), launch.case, arch, str(launch.grid))
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                    options=launch.options.__dict__)
        res.shared = int(kernel.metadata.shared)
        for name, value in ptxas_usage(kernel.asm["ptx"], arch).items():
            setattr(res, name, value)
        res.ok = True
    except Exception as exc:  # noqa: BLE001 -- any compiler error is a result to report
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        res.error = f"{type(exc).__name__}: " + " | ".join(lines[:6])[:600]
        res.flags.append("COMPILE FAILED")
    res.seconds = time.perf_counter() - start
    if res.ok and (res.spill_store or res.spill_load):
        res.flags.append("SPILLS")
    if res.ok and res.shared > SHARED_LIMIT.get(arch, SHARED_LIMIT[90]):
        res.flags.append("SHARED > LIMIT")
    return res


_LAUNCHES: List[Launch] = []  # what the forked compile processes inherit


def _child(index: int, arch: int, conn, err_fd: int) -> None:
    os.dup2(err_fd, 2)  # keep the compiler's own messages (LLVM aborts print to stderr)
    conn.send(compile_launch(_LAUNCHES[index], arch))
    conn.close()


def _compile_isolated(job) -> Result:
    """Compile launch ``index`` in a forked process: a compiler that aborts (an ``LLVM
    ERROR`` kills the process) becomes a failed :class:`Result` instead of ending the run."""
    index, arch = job
    ctx = get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    with tempfile.TemporaryFile() as err:
        proc = ctx.Process(target=_child, args=(index, arch, send, err.fileno()))
        proc.start()
        send.close()
        try:
            res = recv.recv()
        except EOFError:
            res = None
        proc.join()
        if res is None:
            err.seek(0)
            tail = [ln for ln in err.read().decode(errors="replace").splitlines() if ln.strip()]
            la = _LAUNCHES[index]
            res = Result(la.kernel, la.config(), la.case, arch, str(la.grid),
                         error=f"compiler process died (exit code {proc.exitcode}): "
                               + " | ".join(tail[-3:])[:600],
                         flags=["COMPILE FAILED"])
    return res


def compile_all(launches: List[Launch], archs: List[int], jobs: int) -> List[Result]:
    """Compile every launch for every arch, each in its own forked process (it inherits the
    captured launches), ``jobs`` at a time."""
    _LAUNCHES[:] = launches
    work = [(i, arch) for arch in archs for i in range(len(launches))]
    with ThreadPoolExecutor(max(jobs, 1)) as pool:
        return list(pool.map(_compile_isolated, work))


# ============================================================================= coverage

def launched_kernels() -> Dict[str, List[str]]:
    """``{module: [kernel names]}``: the ``@triton.jit`` functions of ``rlkernels/triton/*.py``
    that the module launches (``name[grid](...)``, also through ``wrap_triton(name)``), plus
    any jit function whose name ends in ``_kernel``. Helpers called from kernels are neither."""
    found = {}
    for path in sorted((ROOT / "rlkernels" / "triton").glob("*.py")):
        if path.name == "__init__.py":
            continue
        module = importlib.import_module(f"rlkernels.triton.{path.stem}")
        jitted = {name for name, obj in vars(module).items()
                  if isinstance(obj, KernelInterface)
                  and getattr(getattr(obj, "fn", None), "__module__", "") == module.__name__}
        names = {n for n in jitted if n.endswith("_kernel")}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                target = node.func.value
                if isinstance(target, ast.Call) and target.args:  # wrap_triton(kernel)[grid]
                    target = target.args[0]
                if isinstance(target, ast.Name) and target.id in jitted:
                    names.add(target.id)
        if names:
            found[path.stem] = sorted(names)
    return found


def uncovered(launches: List[Launch], launched: Dict[str, List[str]]) -> List[str]:
    """Launched kernels (by :func:`launched_kernels`) that no captured launch used."""
    seen = {(la.fn.fn.__module__.rsplit(".", 1)[-1], la.kernel) for la in launches}
    return [f"{mod}.{name}" for mod, names in launched.items() for name in names
            if (mod, name) not in seen]


# =============================================================================== report

COLUMNS = ("arch", "kernel", "config", "regs", "spill_store", "spill_load", "shared", "ok",
           "flags", "case", "grid", "seconds", "error")


def table(results: List[Result]) -> str:
    """A markdown table, one row per compiled configuration."""
    lines = ["| arch | kernel | config | regs | spill st/ld B | shared B | status | first case |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        status = ", ".join(r.flags) or "ok"
        if r.error:
            status += f": {r.error[:200]}"
        lines.append(f"| sm_{r.arch} | {r.kernel} | {r.config} | {r.regs} | "
                     f"{r.spill_store}/{r.spill_load} | {r.shared} | {status} | {r.case} |")
    return "\n".join(lines)


def _family(config: str) -> str:
    """The words of a config that set its size: pointer and compute dtypes, block sizes,
    warps and stages (the flags left out vary inside a family)."""
    keep = ("ptr=", "CDT=", "BLOCK", "KC=", "ROWS=", "w")
    return " ".join(w for w in config.split() if w.startswith(keep))


def summary(results: List[Result]) -> str:
    """A condensed markdown table, one row per (arch, kernel, family): how many flag
    configurations, their register range, largest spills and shared memory, and status."""
    groups: Dict[tuple, List[Result]] = {}
    for r in results:
        groups.setdefault((r.arch, r.kernel, _family(r.config)), []).append(r)
    lines = ["| arch | kernel | family (dtypes, blocks, warps/stages) | configs | regs | "
             "max spill st/ld B | max shared B | status |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (arch, kernel, fam), rs in groups.items():
        ok = [r for r in rs if r.ok]
        regs = sorted({r.regs for r in ok})
        reg_range = "-" if not regs else (f"{regs[0]}" if len(regs) == 1
                                          else f"{regs[0]}-{regs[-1]}")
        flagged = sorted({f for r in rs for f in r.flags})
        status = "ok" if not flagged else ", ".join(
            f"{sum(f in r.flags for r in rs)}/{len(rs)} {f}" for f in flagged)
        lines.append(f"| sm_{arch} | {kernel} | {fam} | {len(rs)} | {reg_range} | "
                     f"{max((r.spill_store for r in ok), default=-1)}/"
                     f"{max((r.spill_load for r in ok), default=-1)} | "
                     f"{max((r.shared for r in ok), default=-1)} | {status} |")
    return "\n".join(lines)


def write(results: List[Result], path: Path) -> None:
    """``.csv``: every result; anything else: the condensed table, then every flagged row."""
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            out = csv.writer(f)
            out.writerow(COLUMNS)
            for r in results:
                row = vars(r) | {"flags": ";".join(r.flags)}
                out.writerow([row[c] for c in COLUMNS])
    else:
        flagged = [r for r in results if r.flags]
        path.write_text(summary(results) + "\n\nFlagged configurations:\n\n"
                        + (table(flagged) if flagged else "(none)") + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90],
                    help="compute capabilities to compile for (default: 90)")
    ap.add_argument("--quick", action="store_true",
                    help="one shape per family (every kernel and flag family; the test)")
    ap.add_argument("--out", type=Path, help="also write the table (.md) or rows (.csv)")
    ap.add_argument("--json", type=Path, help="write results and coverage as JSON")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    cases = all_cases(args.quick)
    results: List[Result] = []
    launches: List[Launch] = []
    for arch in args.arch:
        # captured once per arch: the bound options carry the target (arch, dot precisions)
        distinct, case_errors = capture_launches(cases, arch)
        launches = list(distinct.values())
        print(f"sm_{arch}: captured {len(launches)} distinct launches; compiling with "
              f"{args.jobs} processes", flush=True)
        results += compile_all(launches, [arch], args.jobs)
    launched = launched_kernels()
    missing = uncovered(launches, launched)
    print(table(results))
    bad = [r for r in results if r.flags]
    print(f"\n{len(results)} compiles in {time.perf_counter() - t0:.1f} s; "
          f"{sum(not r.ok for r in results)} failed, "
          f"{sum('SPILLS' in r.flags for r in results)} spill, "
          f"{sum('SHARED > LIMIT' in r.flags for r in results)} over the shared limit; "
          f"max regs {max((r.regs for r in results), default=0)}, "
          f"max shared {max((r.shared for r in results), default=0)} B")
    if missing:
        print(f"launched kernels that no case captured: {', '.join(missing)}")
    for err in case_errors:
        print(f"case failed before compiling: {err}")
    if args.out:
        write(results, args.out)
    if args.json:
        args.json.write_text(json.dumps({
            "results": [vars(r) for r in results], "uncovered": missing,
            "case_errors": case_errors, "launched": launched,
            "captured": sorted({f"{la.fn.fn.__module__}.{la.kernel}" for la in launches}),
        }, indent=1))
    return 1 if bad or missing or case_errors else 0


if __name__ == "__main__":
    sys.exit(main())
