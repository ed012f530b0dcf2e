"""Naive fp64 formulas and shared helpers for the tests.

Everything here is written from the definitions in SPEC.md section 3.1 with plain PyTorch
(and numpy for the sampler), never by calling rlkernels: it is the independent
second opinion next to the fp64 ``torch`` backend. The formulas are differentiable through
autograd, which gives the naive gradients. They are written for clarity, not memory: fine for
the small shapes of the tests.

``0 * log 0 = 0`` is written with "safe" ``where`` (mask the argument, not only the result),
so that autograd through a masked ``-inf`` gives 0 instead of ``0 * inf = nan``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np
import pytest
import torch

from rlkernels import backends

NEG_INF = float("-inf")
LOW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ====================================================================== naive formulas (fp64)

def _z(x: torch.Tensor, temperature: float) -> torch.Tensor:
    assert x.dtype == torch.float64
    return x / temperature


def token_logprobs(x, tokens, temperature=1.0, ignore_index=-100):
    """``log_softmax(x / T)`` gathered at the tokens; 0 at ``ignore_index``."""
    logp = torch.log_softmax(_z(x, temperature), dim=-1)
    valid = tokens != ignore_index
    safe = torch.where(valid, tokens, torch.zeros_like(tokens)).long()
    picked = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def entropy(x, temperature=1.0):
    """``-sum p log p`` with ``0 log 0 = 0``."""
    logp = torch.log_softmax(_z(x, temperature), dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def entropy_masked(x, tokens, temperature=1.0, ignore_index=-100):
    h = entropy(x, temperature)
    return torch.where(tokens != ignore_index, h, torch.zeros_like(h))


def _id_sets(indices: torch.Tensor) -> List[set]:
    """The distinct valid ids of every row of ``indices [N, K]`` (-1 = unused slot)."""
    return [{int(i) for i in row if int(i) >= 0} for row in indices.reshape(-1, indices.shape[-1])]


def _outside_mask(indices: torch.Tensor, vocab: int) -> torch.Tensor:
    """Bool ``[N, V]``: column j is not one of the row's ids (built with a Python loop)."""
    sets = _id_sets(indices)
    mask = torch.ones(len(sets), vocab, dtype=torch.bool)
    for r, ids in enumerate(sets):
        for j in ids:
            mask[r, j] = False
    return mask.to(indices.device)


def sparse_logprobs(x, indices, temperature=1.0, normalize="full"):
    """Log-probs at ``indices [..., K]``; -1 slots give -inf.

    full: log_softmax over V gathered; support: ``z_k - log sum_{valid slots} exp(z_k)``
    (a repeated id counts once per slot, as documented)."""
    vocab = x.shape[-1]
    z = _z(x, temperature).reshape(-1, vocab)
    idx = indices.reshape(-1, indices.shape[-1])
    valid = idx >= 0
    safe = torch.where(valid, idx, torch.zeros_like(idx)).long()
    if normalize == "full":
        vals = torch.log_softmax(z, dim=-1).gather(1, safe)
    else:
        zk = z.gather(1, safe)
        zk_valid = torch.where(valid, zk, torch.full_like(zk, NEG_INF))
        m = zk_valid.amax(-1, keepdim=True).detach()
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        w = torch.where(valid, torch.exp(zk - m), torch.zeros_like(zk))
        vals = zk - (m + torch.log(w.sum(-1, keepdim=True)))
    out = torch.where(valid, vals, torch.full_like(vals, NEG_INF))
    return out.reshape(indices.shape)


def log_tail(x, indices, temperature=1.0):
    """``log(1 - sum of p over the distinct valid ids)``, as the log of the plain sum of the
    probabilities of the columns outside the ids (exactly -inf when nothing is outside)."""
    vocab = x.shape[-1]
    p = torch.softmax(_z(x, temperature).reshape(-1, vocab), dim=-1)
    outside = _outside_mask(indices, vocab)
    mass = torch.where(outside, p, torch.zeros_like(p)).sum(-1)
    return torch.log(mass).reshape(x.shape[:-1])


def log1m_sum(x, indices, temperature=1.0):
    """``log1p(-sum over the distinct valid ids of p)``: the literal formula of the tail."""
    vocab = x.shape[-1]
    p = torch.softmax(_z(x, temperature).reshape(-1, vocab), dim=-1)
    inside = ~_outside_mask(indices, vocab)
    s = torch.where(inside, p, torch.zeros_like(p)).sum(-1)
    return torch.log1p(-s).reshape(x.shape[:-1])


def sparse_kl(x, indices, target_logprobs, temperature=1.0, tail=True):
    """``sum_k t_k (log t_k - log s_k) [+ t_tail (log t_tail - log s_tail)]``, explicit."""
    vocab = x.shape[-1]
    k = indices.shape[-1]
    idx = indices.reshape(-1, k)
    valid = idx >= 0
    t_log = target_logprobs.reshape(-1, k).to(torch.float64)
    t = torch.where(valid, t_log.exp(), torch.zeros_like(t_log))
    s_log = sparse_logprobs(x.reshape(-1, vocab), idx, temperature, "full")
    s_log_safe = torch.where(t > 0, s_log, torch.zeros_like(s_log))
    t_log_safe = torch.where(t > 0, t_log, torch.zeros_like(t_log))
    kl = (t * (t_log_safe - s_log_safe)).sum(-1)
    if tail:
        t_tail = (1.0 - t.sum(-1)).clamp_min(0.0)
        # no column outside the ids: an empty bucket holds no teacher mass (1 - sum t is
        # rounding) and contributes nothing
        empty = ~_outside_mask(idx, vocab).any(-1)
        t_tail = torch.where(empty, torch.zeros_like(t_tail), t_tail)
        s_tail = log_tail(x.reshape(-1, vocab), idx, temperature)
        pos = t_tail > 0
        one = torch.ones_like(t_tail)
        term = t_tail * (torch.log(torch.where(pos, t_tail, one))
                         - torch.where(pos, s_tail, torch.zeros_like(s_tail)))
        kl = kl + term
    return kl.reshape(x.shape[:-1])


def _kl(a_log, b_log):
    """``KL(a || b) = sum a (log a - log b)`` with ``0 log 0 = 0`` (explicit sum)."""
    a = a_log.exp()
    pos = a > 0
    diff = torch.where(pos, a_log, torch.zeros_like(a_log)) - torch.where(
        pos, b_log, torch.zeros_like(b_log))
    return (a * diff).sum(-1)


def kl_divergence(x, y, kind="reverse", beta=0.5, temperature=1.0, ignore_mask=None):
    logp = torch.log_softmax(_z(x, temperature), dim=-1)
    logq = torch.log_softmax(_z(y, temperature), dim=-1)
    if kind == "reverse":
        out = _kl(logp, logq)
    elif kind == "forward":
        out = _kl(logq, logp)
    else:
        p, q = logp.exp(), logq.exp()
        m = beta * p + (1.0 - beta) * q
        logm = torch.log(torch.where(m > 0, m, torch.ones_like(m)))
        logm = torch.where(m > 0, logm, torch.full_like(logm, NEG_INF))
        out = beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)
    if ignore_mask is not None:
        out = torch.where(ignore_mask, torch.zeros_like(out), out)
    return out


def sampler_support(row: Sequence[float], top_k: Optional[int], top_p: Optional[float],
                    temperature: float = 1.0) -> List[int]:
    """The ids a top-k then top-p sampler can emit from one row, in fp64 with numpy.

    Rank by decreasing logit, ties by increasing id; drop -inf; keep the first ``top_k``;
    then, on the distribution renormalized over those, keep an id iff the mass ranked above it
    is ``< top_p`` (top_p = 1 keeps everything)."""
    z = np.asarray(row, dtype=np.float64) / temperature
    ids = np.arange(z.shape[0])
    order = np.lexsort((ids, -z))          # last key is primary: -z ascending, then id
    order = order[np.isfinite(z[order])]
    if top_k is not None:
        order = order[:top_k]
    if top_p is not None and top_p < 1.0 and order.size:
        w = np.exp(z[order] - z[order[0]])
        probs = w / w.sum()
        above = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
        order = order[above < top_p]
    return order.tolist()


# ============================================================================= test inputs

def make_logits(n: int, vocab: int, dtype: torch.dtype, *, kind: str = "mixed", seed: int = 0,
                center: bool = False, device="cpu") -> torch.Tensor:
    """``[n, vocab]`` logits, exactly representable in ``dtype`` (built in fp64, rounded once).

    kinds (``"mixed"`` cycles through the first four row by row, so one call covers them all):
      * ``normal``: N(0, 3^2), the spread of real LM logits;
      * ``peaked``: N(0, 1) plus one column 20-40 above the rest (a confident model: the
        top-1 probability is 1 - tiny, where cancellation in lse / entropy shows up);
      * ``flat``: every column equal (entropy = log V, the largest; every p = 1/V);
      * ``masked``: N(0, 3^2) with about a third of the columns at -inf (masked vocabulary),
        never all of them;
      * ``peaked_masked``: peaked plus -inf columns.
    ``center`` shifts each row so that its max is 0 (logits like log-probs).
    """
    g = torch.Generator().manual_seed(seed)
    kinds = ["normal", "peaked", "flat", "masked"] if kind == "mixed" else [kind]
    rows = []
    for r in range(n):
        k = kinds[r % len(kinds)]
        if k == "flat":
            row = torch.full((vocab,), float(torch.randn((), generator=g, dtype=torch.float64)),
                             dtype=torch.float64)
        elif k in ("peaked", "peaked_masked"):
            row = torch.randn(vocab, generator=g, dtype=torch.float64)
            j = int(torch.randint(vocab, (), generator=g))
            row[j] += 20.0 + 20.0 * float(torch.rand((), generator=g, dtype=torch.float64))
        else:
            row = 3.0 * torch.randn(vocab, generator=g, dtype=torch.float64)
        if k in ("masked", "peaked_masked") and vocab > 1:
            drop = torch.rand(vocab, generator=g) < 1 / 3
            drop[int(row.argmax())] = False  # at least one finite column per row
            row = row.masked_fill(drop, NEG_INF)
        rows.append(row)
    x = torch.stack(rows) if rows else torch.empty(0, vocab, dtype=torch.float64)
    if center and n:
        x = x - x.amax(-1, keepdim=True)
    return x.to(dtype).to(device)


def make_tokens(x: torch.Tensor, *, seed: int = 0, ignore_index: int = -100,
                pad_every: int = 0, dtype=torch.int64) -> torch.Tensor:
    """Tokens for logits ``x [..., V]``: random finite-logit ids (a sampled token never has a
    -inf logit), and every ``pad_every``-th position set to ``ignore_index``."""
    g = torch.Generator().manual_seed(seed + 1)
    flat = x.reshape(-1, x.shape[-1]).detach().cpu().double()
    finite = torch.isfinite(flat)
    weights = torch.where(finite, torch.ones_like(flat), torch.zeros_like(flat))
    tok = torch.multinomial(weights, 1, generator=g)[:, 0] if flat.shape[0] else \
        torch.zeros(0, dtype=torch.int64)
    if pad_every:
        tok[::pad_every] = ignore_index
    return tok.to(dtype).reshape(x.shape[:-1]).to(x.device)


def make_indices(x: torch.Tensor, k: int, *, seed: int = 0, unused: bool = True,
                 dtype=torch.int64) -> torch.Tensor:
    """``[..., K]`` distinct ids per row: the row's argmax first (a sampler's support always
    holds the top id, so a support never has only zero-probability ids), then random ids;
    with ``unused``, every other row ends in a -1 slot (a support padded to a fixed K)."""
    g = torch.Generator().manual_seed(seed + 2)
    vocab = x.shape[-1]
    flat = x.reshape(-1, vocab).detach().cpu()
    n = flat.shape[0]
    k_eff = min(k, vocab)
    rows = []
    for r in range(n):
        top = int(flat[r].double().argmax())
        perm = torch.randperm(vocab, generator=g)
        perm = torch.cat([torch.tensor([top]), perm[perm != top]])[:k_eff]
        row = torch.full((k,), -1, dtype=torch.int64)
        row[:k_eff] = perm
        if unused and k > 1 and r % 2 == 1:
            row[-1] = -1
        rows.append(row)
    idx = torch.stack(rows) if rows else torch.empty(0, k, dtype=torch.int64)
    return idx.to(dtype).reshape(*x.shape[:-1], k).to(x.device)


def make_targets(x_ref: torch.Tensor, indices: torch.Tensor, *, seed: int = 0,
                 dtype=torch.float32) -> torch.Tensor:
    """Teacher log-probs at ``indices``: a normalized full-vocabulary distribution (random
    teacher logits), gathered; unused slots get a NaN that must never be read."""
    g = torch.Generator().manual_seed(seed + 3)
    teacher = torch.log_softmax(2.0 * torch.randn(*x_ref.shape, generator=g,
                                                  dtype=torch.float64), dim=-1)
    idx = indices.cpu().long()
    vals = teacher.gather(-1, idx.clamp_min(0))
    vals = torch.where(idx >= 0, vals, torch.full_like(vals, float("nan")))
    return vals.to(dtype).to(x_ref.device)


# ============================================================================= tolerances

def assert_values_close(out: torch.Tensor, ref: torch.Tensor, *, atol=1e-5, rtol=1e-5,
                        what=""):
    """SPEC section 5 for per-token outputs: ``atol=1e-5, rtol=1e-5`` of the fp64 reference;
    -inf must match -inf exactly."""
    torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), atol=atol, rtol=rtol,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def fp32_floor(*logits: torch.Tensor, temperature: float = 1.0, upstream: float = 1.0
               ) -> float:
    """``eps(fp32) * (max |z| + log V) * upstream / T`` over the finite ``z = logits / T``.

    The floor of fp32 arithmetic (SPEC section 1: math in fp32 for bf16/fp16/fp32 inputs) on
    a gradient: ``z = x / T``, ``lse`` and ``log p - log q`` are log-domain values of magnitude
    up to ``max|z| + log V`` and carry an absolute rounding error of ``eps(fp32)`` times that,
    which is a relative error of every ``p``. A gradient entry is a difference of terms of
    size ``upstream / T * p`` (``onehot - p``, ``q - p``, ...), ``upstream`` being the largest
    sum of ``|upstream gradient|`` feeding one row; the difference can be much smaller than
    its terms, the rounding of the terms is not.
    """
    worst = 0.0
    for x in logits:
        z = x.detach().double() / temperature
        finite = z[torch.isfinite(z)]
        m = float(finite.abs().max()) if finite.numel() else 0.0
        worst = max(worst, m + math.log(max(x.shape[-1], 1)))
    return torch.finfo(torch.float32).eps * worst * upstream / temperature


def row_weight(*weights: torch.Tensor, per_row_dims: int = 0) -> float:
    """``upstream`` for :func:`fp32_floor`: the sum over the given upstream gradients of the
    largest ``sum |w|`` over one row (``per_row_dims`` trailing dims belong to one row)."""
    total = 0.0
    for w in weights:
        a = w.detach().double().abs()
        if per_row_dims and a.dim():
            a = a.sum(dim=tuple(range(-per_row_dims, 0)))
        total += float(a.max()) if a.numel() else 0.0
    return total


def grad_tolerance(g_ref: torch.Tensor, dtype: torch.dtype, floor: float = 0.0,
                   spec_only: bool = False) -> float:
    """SPEC section 5, ``2 * eps(dtype) * max|g_ref| + 1e-7``, plus the fp32 arithmetic
    ``floor`` (:func:`fp32_floor`).

    The floor is negligible next to ``eps(dtype)`` for bf16/fp16 inputs. For fp32 inputs with
    logits of magnitude 20-40 it dominates, and the bare SPEC bound does not hold for any fp32
    implementation (``test_fp32_grad_of_large_logits_within_spec`` shows it); ``spec_only``
    drops it.
    """
    m = float(g_ref.abs().max()) if g_ref.numel() else 0.0
    return 2.0 * torch.finfo(dtype).eps * m + 1e-7 + (0.0 if spec_only else floor)


def assert_grad_close(g: torch.Tensor, g_ref: torch.Tensor, dtype: torch.dtype,
                      floor: float = 0.0, spec_only: bool = False, what=""):
    """``|g - g_ref| <= grad_tolerance(g_ref, dtype, floor)`` elementwise; ``g`` has the dtype
    of the logits, and no NaN or inf."""
    assert g.dtype == dtype, f"{what}: gradient dtype {g.dtype}, expected {dtype}"
    assert g.shape == g_ref.shape
    g64, r64 = g.double().cpu(), g_ref.double().cpu()
    assert torch.isfinite(r64).all(), f"{what}: non-finite reference gradient"
    assert torch.isfinite(g64).all(), f"{what}: non-finite gradient"
    tol = grad_tolerance(r64, dtype, floor, spec_only)
    err = float((g64 - r64).abs().max()) if g64.numel() else 0.0
    assert err <= tol, f"{what}: max |g - g_ref| = {err:.3e} > tolerance {tol:.3e} ({dtype})"


def bit_equal(a, b) -> bool:
    """Bit-identical tensors: same dtype, shape and bits (NaN payloads included)."""
    if a is None or b is None:
        return a is b
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.contiguous().view(bits), b.contiguous().view(bits)
    return bool(torch.equal(a, b))


# ============================================================================= backends

def needs(backend: str, op: str, device="cpu", numel: int = 0) -> None:
    """Skip when ``backend`` has no kernels for ``op`` yet, or when the case is too big for
    the Triton interpreter on CPU (DESIGN section 5: interpreter tests stay small)."""
    if not backends.implements(backend, "vocab", op):
        pytest.skip(f"backend {backend!r} has no {op} kernels yet")
    if backend == "triton" and torch.device(device).type == "cpu" and numel > 1 << 16:
        pytest.skip("too large for the Triton interpreter (GPU covers it)")
