"""The one declarative list of op cases of the contract suite (tests/contract/).

Every public op of SPEC section 3 appears here with a few small cases. A :class:`Case` says
how to build its inputs (seeded, CPU, fp64 values), which float inputs take the dtype under
test, how to call the **public** op (``rlkernels.<op>(..., backend=...)``) and flatten what
it returns into a tuple of tensors, which inputs are differentiable, how rows are laid out
(for batch invariance), which inputs are integer ids (int32 vs int64) and what the padding
contract says about its outputs and gradients. The properties in test_*.py are written
once against this description, never per op.

Shapes are tiny on purpose (the Triton interpreter runs every program of a grid on the CPU:
N * V stays at a few hundred elements): V = 7 (below any block size, odd) and V = 33 (just
above a power of two); rows cycle through normal, peaked (one logit 20-40 above the rest),
flat and ``-inf``-masked rows (tests/_naive.py ``make_logits``); padding tokens (-100), a
fully padded / fully masked sequence, unused sparse slots (-1) and a row of unused slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from _naive import fp32_floor, make_indices, make_logits, make_targets, make_tokens

import rlkernels as rk
from rlkernels import backends

try:  # the backend fixture's own list (tests/conftest.py), so both agree
    from conftest import DEVICE, RUNNABLE_BACKENDS
except ImportError:  # pragma: no cover - run outside pytest's rootdir
    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    RUNNABLE_BACKENDS = [b for b in backends.BACKENDS
                         if rk.available_backends()[b] == "ok"
                         and (b != "cuda" or torch.cuda.is_available())]

F64 = torch.float64
IGNORE = -100
NEG_INF = float("-inf")
Tensor = torch.Tensor
Inputs = Dict[str, Optional[Tensor]]

# ============================================================================ implements()

# The family of each kernel op, for the (name, family, op) form of backends.implements.
_FAMILY = {
    "token_logprobs": "vocab", "entropy": "vocab", "kl_divergence": "vocab",
    "sparse_logprobs": "sparse", "sparse_kl": "sparse",
    "policy_loss": "policy", "grpo_loss": "policy", "kl_penalty": "policy",
    "group_advantages": "advantage", "masked_whiten": "advantage", "gae": "advantage",
    "discounted_returns": "advantage", "discounted_advantages": "advantage",
    "linear_token_logprobs": "linear", "linear_grpo_loss": "linear",
    "linear_sparse_logprobs": "linear",
    "rollout_correction": "rollout",
}
# Public ops without a backend argument: the torch reference only.
TORCH_ONLY = ("kl_penalty", "sampling_support")
# Public ops that run another op's kernels (entropy is token_logprobs without tokens).
_KERNEL_OP = {"entropy": "token_logprobs"}


def implements(backend: str, op: str) -> bool:
    """Whether ``backend`` has kernels for public ``op``; works with the new
    ``implements(name, op)`` and the older ``implements(name, family, op)`` signatures.
    ``kl_penalty`` has no ``backend`` argument: it is the torch reference only."""
    if op in TORCH_ONLY:
        return backend == "torch"
    for name in (op, _KERNEL_OP.get(op)):
        if name is None:
            continue
        try:
            if backends.implements(backend, name):
                return True
        except TypeError:  # the (name, family, op) signature
            kernel = _KERNEL_OP.get(op, op)
            return bool(backends.implements(backend, _FAMILY[kernel], kernel))
        except (KeyError, ValueError):  # an op name the table does not know
            continue
    return False


# ================================================================================ the cases

@dataclass
class Pad:
    """What SPEC says about padded / masked positions of one input set.

    ``zero_out``: output index -> bool mask of positions that must be exactly 0.
    ``inf_out``: output index -> bool mask of positions that must be -inf, ``posinf_out``
    the same for +inf (every other position of every output must be finite).
    ``zero_grad``: input name -> bool mask over the input's leading dims whose gradient must
    be exactly 0 (broadcast over the trailing dims).
    ``poison``: (input name, bool mask, value) written into the inputs; the outputs at
    ``keep_out`` (output index -> mask, ``None`` = the whole output) and the gradients at
    ``keep_grad`` (input name -> mask over leading dims) must stay bit-identical.
    ``check(inputs, outputs)``: any other assertion the op's contract makes.
    """
    zero_out: Dict[int, Tensor] = field(default_factory=dict)
    inf_out: Dict[int, Tensor] = field(default_factory=dict)
    posinf_out: Dict[int, Tensor] = field(default_factory=dict)
    zero_grad: Dict[str, Tensor] = field(default_factory=dict)
    poison: List[Tuple[str, Tensor, float]] = field(default_factory=list)
    keep_out: Dict[int, Optional[Tensor]] = field(default_factory=dict)
    keep_grad: Dict[str, Tensor] = field(default_factory=dict)
    check: Optional[Callable[[Inputs, Sequence[Tensor]], None]] = None   # anything else


@dataclass
class Case:
    op: str                                   # the public op (rlkernels.<op>)
    name: str                                 # short id of the case
    build: Callable[[int], Inputs]            # seed -> fp64 float / int64 / bool inputs
    call: Callable[[Inputs, str], Tuple[Tensor, ...]]   # (inputs, backend) -> outputs
    primary: Tuple[str, ...]                  # float inputs in the dtype under test (others fp32)
    diff: Tuple[str, ...] = ()                # differentiable inputs
    ints: Tuple[str, ...] = ()                # integer id inputs (int32 vs int64)
    # batch invariance: input name -> its batch dim, output index -> its batch dim; the
    # rows taken alone (None: the last index of dim 0); None rows_in: property not defined
    rows_in: Optional[Dict[str, int]] = None
    rows_out: Dict[int, int] = field(default_factory=dict)
    take: Optional[Callable[[Inputs], Sequence[int]]] = None
    pad: Optional[Callable[[Inputs], Pad]] = None
    # gradient tolerance: floor(fp64 inputs, fp64 upstreams) added to SPEC 5's bound
    floor: Callable[[Inputs, Sequence[Optional[Tensor]]], float] = lambda i, u: 0.0
    eps_mult: Callable[[torch.dtype], float] = lambda dtype: 2.0
    dtypes: Tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
    compile: bool = False                     # the op's one torch.compile case
    big: bool = False                         # realistic V: not run by the Triton interpreter

    @property
    def id(self) -> str:
        return f"{self.op}:{self.name}"


def cast(case: Case, inp: Inputs, dtype: torch.dtype, device="cpu") -> Inputs:
    """Inputs of the run under test: primary floats in ``dtype``, other floats in fp32 (fp64
    when ``dtype`` is fp64), ints and bools as they are."""
    out: Inputs = {}
    for k, v in inp.items():
        if isinstance(v, Tensor):
            if v.is_floating_point():
                v = v.to(dtype if (k in case.primary or dtype == F64) else torch.float32)
            v = v.to(device)
        out[k] = v
    return out


def exact64(inp: Inputs) -> Inputs:
    """fp64 copies of the same values on the CPU (the reference's inputs)."""
    return {k: (v.detach().cpu().double() if isinstance(v, Tensor) and v.is_floating_point()
                else (v.cpu() if isinstance(v, Tensor) else v)) for k, v in inp.items()}


# ---------------------------------------------------------------------------- builders

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(shape, vocab, seed, **kw) -> Tensor:
    n = math.prod(shape)
    return make_logits(n, vocab, F64, seed=seed, **kw).reshape(*shape, vocab)


def _ref_logits(x: Tensor, seed: int) -> Tensor:
    """A second distribution with the same -inf columns (a KL between them is finite)."""
    y = make_logits(x.reshape(-1, x.shape[-1]).shape[0], x.shape[-1], F64, kind="normal",
                    seed=seed).reshape(x.shape)
    return torch.where(torch.isinf(x), x, y)


def _tokens(x: Tensor, seed: int) -> Tensor:
    """Random finite-logit ids; rows 0 and 5 (a normal and a peaked row) are padding."""
    return make_tokens(x, seed=seed, pad_every=5)


def _vocab_floor(*names: str, temperature: float = 1.0):
    """The fp32 arithmetic floor of a logits gradient (tests/_naive.py fp32_floor) with the
    upstream weight of a row = the sum of |upstream| over every output entry of that row."""
    def floor(inp: Inputs, ups: Sequence[Optional[Tensor]]) -> float:
        lead = inp[names[0]].dim() - 1
        w = None
        for u in ups:
            if u is None or u.dim() < lead:
                continue
            a = u.abs().reshape(*u.shape[:lead], -1).sum(-1)
            w = a if w is None else w + a
        weight = float(w.max()) if w is not None and w.numel() else 0.0
        return fp32_floor(*(inp[n] for n in names), temperature=temperature, upstream=weight)
    return floor


def _nonfinite(x: Tensor) -> Tensor:
    return ~torch.isfinite(x)


# ------------------------------------------------------------------------ vocabulary ops

# [B, T] of the vocabulary cases: N = 6 rows, normal, peaked, flat, -inf-masked, normal,
# peaked (make_logits "mixed"); the interpreter's time grows with the rows
SHAPE = (2, 3)


def _tl_build(vocab, shape=SHAPE):
    def build(seed):
        x = _logits(shape, vocab, seed)
        return {"logits": x, "tokens": _tokens(x, seed)}
    return build


def _tl_pad(n_out):
    def pad(inp):
        padded = inp["tokens"] == IGNORE
        x = inp["logits"]
        return Pad(zero_out={i: padded for i in range(n_out)},
                   inf_out={0: ~padded & torch.isinf(
                       x.gather(-1, inp["tokens"].clamp_min(0).long()[..., None])[..., 0])},
                   zero_grad={"logits": padded})
    return pad


def token_logprobs_cases() -> List[Case]:
    def plain(i, b):
        return (rk.token_logprobs(i["logits"], i["tokens"], backend=b),)

    def with_entropy(i, b):
        return tuple(rk.token_logprobs(i["logits"], i["tokens"], temperature=0.7,
                                       return_entropy=True, backend=b))

    def ignore3(i, b):  # a vocabulary id as ignore_index (the padding marker is any int)
        tok = torch.where(i["tokens"] == IGNORE, torch.full_like(i["tokens"], 3), i["tokens"])
        return (rk.token_logprobs(i["logits"], tok, ignore_index=3, backend=b),)

    common = dict(primary=("logits",), diff=("logits",), ints=("tokens",),
                  rows_in={"logits": 0, "tokens": 0})
    return [
        Case("token_logprobs", "V7", _tl_build(7), plain, rows_out={0: 0}, pad=_tl_pad(1),
             floor=_vocab_floor("logits"), compile=True, **common),
        Case("token_logprobs", "V33-entropy-T0.7", _tl_build(33), with_entropy,
             rows_out={0: 0, 1: 0}, pad=_tl_pad(2),
             floor=_vocab_floor("logits", temperature=0.7),
             dtypes=(torch.float32, torch.bfloat16, torch.float16), **common),
        Case("token_logprobs", "2d-ignore3", _tl_build(33, shape=(6,)), ignore3,
             rows_out={0: 0}, floor=_vocab_floor("logits"),
             dtypes=(torch.float32,), **common),
        # realistic vocabularies (SPEC 5: 50257, 151936), too big for the interpreter
        Case("token_logprobs", "V50257-entropy", _tl_build(50257), with_entropy,
             rows_out={0: 0, 1: 0}, pad=_tl_pad(2),
             floor=_vocab_floor("logits", temperature=0.7), big=True, **common),
        Case("token_logprobs", "V151936", _tl_build(151936), plain, rows_out={0: 0},
             pad=_tl_pad(1), floor=_vocab_floor("logits"), big=True, **common),
    ]


def entropy_cases() -> List[Case]:
    def build(vocab):
        return lambda seed: {"logits": _logits(SHAPE, vocab, seed)}

    def pad(inp):  # no padding: every row (-inf columns, flat, peaked) finite
        return Pad()

    common = dict(primary=("logits",), diff=("logits",), rows_in={"logits": 0},
                  rows_out={0: 0}, pad=pad)
    return [
        Case("entropy", "V7", build(7), lambda i, b: (rk.entropy(i["logits"], backend=b),),
             floor=_vocab_floor("logits"), compile=True, **common),
        Case("entropy", "V33-T1.3", build(33),
             lambda i, b: (rk.entropy(i["logits"], temperature=1.3, backend=b),),
             floor=_vocab_floor("logits", temperature=1.3), **common),
    ]


def _sparse_build(vocab, k, targets=False):
    def build(seed):
        x = _logits(SHAPE, vocab, seed)
        idx = make_indices(x, k, seed=seed)
        idx[0, 1] = -1                       # a row of unused slots only
        out = {"logits": x, "indices": idx}
        if targets:
            out["target"] = make_targets(x, idx, seed=seed, dtype=F64)
        return out
    return build


def _sparse_inf(inp):
    """-inf where the slot is unused or the id's logit is -inf."""
    idx = inp["indices"].long()
    at = inp["logits"].gather(-1, idx.clamp_min(0))
    return (idx < 0) | torch.isinf(at)


def _as_csr(idx: Tensor) -> Tuple[Tensor, Tensor]:
    """The padded ``[..., K]`` ids as a CSR support (issue 21): every row's ``K`` slots (its
    -1 slots kept) flat, ``offsets = K r`` in the ids' dtype; a ``[nnz]`` output views back
    as ``[..., K]``, so the padded case's contract applies unchanged to the CSR code path
    (ragged rows: tests/ops/test_sparse_csr.py)."""
    k = idx.shape[-1]
    n = idx.numel() // k if k else 0
    return idx.reshape(-1), torch.arange(n + 1, dtype=idx.dtype, device=idx.device) * k


def sparse_logprobs_cases() -> List[Case]:
    def csr_full_tail(i, b):
        ids, off = _as_csr(i["indices"])
        lp, tail = rk.sparse_logprobs(i["logits"], ids, offsets=off, return_tail=True,
                                      backend=b)
        return lp.view(i["indices"].shape), tail

    def csr_support(i, b):
        ids, off = _as_csr(i["indices"])
        return (rk.sparse_logprobs(i["logits"], ids, offsets=off, normalize="support",
                                   temperature=0.8, backend=b).view(i["indices"].shape),)

    def full_tail(i, b):
        return tuple(rk.sparse_logprobs(i["logits"], i["indices"], return_tail=True, backend=b))

    def support(i, b):
        return (rk.sparse_logprobs(i["logits"], i["indices"], normalize="support",
                                   temperature=0.8, backend=b),)

    def cover(i, b):  # K = V: the ids cover the vocabulary, the tail is log 0 = -inf
        return tuple(rk.sparse_logprobs(i["logits"], i["indices"], return_tail=True,
                                        backend=b))

    def pad_full(inp):
        empty = (inp["indices"] < 0).all(-1)
        return Pad(inf_out={0: _sparse_inf(inp)}, zero_out={1: empty},
                   zero_grad={"logits": empty})

    def pad_support(inp):
        empty = (inp["indices"] < 0).all(-1)
        return Pad(inf_out={0: _sparse_inf(inp)}, zero_grad={"logits": empty})

    def pad_cover(inp):
        empty = (inp["indices"] < 0).all(-1)
        idx = inp["indices"]
        # a row whose valid ids are every column has no tail: -inf
        covered = torch.zeros_like(empty)
        v = inp["logits"].shape[-1]
        flat = idx.reshape(-1, idx.shape[-1])
        cov = torch.tensor([len({int(j) for j in r if j >= 0}) == v for r in flat])
        covered = cov.reshape(empty.shape)
        return Pad(inf_out={0: _sparse_inf(inp), 1: covered}, zero_out={1: empty},
                   zero_grad={"logits": empty})

    common = dict(primary=("logits",), diff=("logits",), ints=("indices",),
                  rows_in={"logits": 0, "indices": 0}, rows_out={0: 0, 1: 0})
    return [
        Case("sparse_logprobs", "full-tail-V33-K4", _sparse_build(33, 4), full_tail,
             pad=pad_full, floor=_vocab_floor("logits"), compile=True, **common),
        Case("sparse_logprobs", "support-T0.8-V7-K3", _sparse_build(7, 3), support,
             pad=pad_support, floor=_vocab_floor("logits", temperature=0.8),
             **{**common, "rows_out": {0: 0}}),
        Case("sparse_logprobs", "cover-V7-K7", _sparse_build(7, 7), cover, pad=pad_cover,
             floor=_vocab_floor("logits"), dtypes=(torch.float32,), **common),
        Case("sparse_logprobs", "full-tail-V50257-K16", _sparse_build(50257, 16), full_tail,
             pad=pad_full, floor=_vocab_floor("logits"), big=True, **common),
        Case("sparse_logprobs", "csr-full-tail-V33-K4", _sparse_build(33, 4), csr_full_tail,
             pad=pad_full, floor=_vocab_floor("logits"), **common),
        Case("sparse_logprobs", "csr-support-T0.8-V7-K3", _sparse_build(7, 3), csr_support,
             pad=pad_support, floor=_vocab_floor("logits", temperature=0.8),
             **{**common, "rows_out": {0: 0}}),
    ]


def sparse_kl_cases() -> List[Case]:
    def tail(i, b):
        return (rk.sparse_kl(i["logits"], i["indices"], i["target"], backend=b),)

    def no_tail(i, b):
        return (rk.sparse_kl(i["logits"], i["indices"], i["target"], temperature=0.9,
                             tail=False, backend=b),)

    def pad(inp):
        empty = (inp["indices"] < 0).all(-1)
        # the teacher puts mass on an id whose student logit is -inf: KL = +inf (SPEC: a
        # -inf logit has log-prob -inf), every other row finite
        infinite = (_sparse_inf(inp) & (inp["indices"] >= 0)).any(-1)
        return Pad(zero_out={0: empty}, posinf_out={0: infinite},
                   zero_grad={"logits": empty})

    common = dict(primary=("logits",), diff=("logits",), ints=("indices",),
                  rows_in={"logits": 0, "indices": 0, "target": 0}, rows_out={0: 0},
                  pad=pad)

    def kind_call(kind, alpha=None, temperature=1.0, with_tail=True, csr=False):
        def f(i, b):
            if csr:  # issue 21: the same supports as CSR
                ids, off = _as_csr(i["indices"])
                return (rk.sparse_kl(i["logits"], ids, i["target"].reshape(ids.shape),
                                     offsets=off, kind=kind, alpha=alpha,
                                     temperature=temperature, tail=with_tail, backend=b),)
            return (rk.sparse_kl(i["logits"], i["indices"], i["target"], kind=kind,
                                 alpha=alpha, temperature=temperature, tail=with_tail,
                                 backend=b),)
        return f

    def pad_bounded(inp):
        # issue 21's kinds: the student's -inf ids weigh 0 in KL(s || t), jsd, alpha and tv
        # (the teacher's K masses stay below 1 here: KL(s || t) is finite too)
        empty = (inp["indices"] < 0).all(-1)
        return Pad(zero_out={0: empty}, zero_grad={"logits": empty})

    def scaled(floor, k):
        # alpha's gradient terms are (s - r) / (1 - a) and a D s: k = 1 + 1 / (a (1 - a))
        # times the size of a KL's
        return lambda i, u: k * floor(i, u)

    kinds = {**common, "pad": pad_bounded}
    return [
        Case("sparse_kl", "tail-V33-K4", _sparse_build(33, 4, targets=True), tail,
             floor=_vocab_floor("logits"), compile=True, **common),
        Case("sparse_kl", "no-tail-T0.9-V7-K3", _sparse_build(7, 3, targets=True), no_tail,
             floor=_vocab_floor("logits", temperature=0.9), **common),
        # issue 21: the other kinds over the same buckets
        Case("sparse_kl", "reverse-tail-V33-K4", _sparse_build(33, 4, targets=True),
             kind_call("reverse"), floor=_vocab_floor("logits"), **kinds),
        Case("sparse_kl", "alpha0.7-no-tail-T0.9-V7-K3", _sparse_build(7, 3, targets=True),
             kind_call("alpha", alpha=0.7, temperature=0.9, with_tail=False),
             floor=scaled(_vocab_floor("logits", temperature=0.9), 1 + 1 / 0.21), **kinds),
        Case("sparse_kl", "tv-tail-V33-K4", _sparse_build(33, 4, targets=True),
             kind_call("tv"), floor=_vocab_floor("logits"), **kinds),
        Case("sparse_kl", "csr-tail-V33-K4", _sparse_build(33, 4, targets=True),
             kind_call("forward", csr=True), floor=_vocab_floor("logits"), **common),
        Case("sparse_kl", "csr-alpha0.7-no-tail-T0.9-V7-K3", _sparse_build(7, 3, targets=True),
             kind_call("alpha", alpha=0.7, temperature=0.9, with_tail=False, csr=True),
             floor=scaled(_vocab_floor("logits", temperature=0.9), 1 + 1 / 0.21), **kinds),
    ]


def kl_divergence_cases() -> List[Case]:
    def build(vocab, mask=False):
        def b(seed):
            x = _logits(SHAPE, vocab, seed)
            out = {"logits": x, "ref_logits": _ref_logits(x, seed + 7)}
            if mask:
                m = torch.zeros(SHAPE, dtype=torch.bool)
                m[0, 0] = True               # ignored rows
                m[1, 2] = True
                out["ignore_mask"] = m
            return out
        return b

    def call(kind, beta=0.5, temperature=1.0, alpha=None):
        def f(i, b):
            return (rk.kl_divergence(i["logits"], i["ref_logits"], kind=kind, beta=beta,
                                     alpha=alpha, temperature=temperature,
                                     ignore_mask=i.get("ignore_mask"), backend=b),)
        return f

    def pad(inp):
        m = inp.get("ignore_mask")
        if m is None:
            return Pad()
        return Pad(zero_out={0: m}, zero_grad={"logits": m, "ref_logits": m})

    common = dict(primary=("logits", "ref_logits"), diff=("logits", "ref_logits"),
                  rows_in={"logits": 0, "ref_logits": 0, "ignore_mask": 0}, rows_out={0: 0},
                  pad=pad)
    return [
        Case("kl_divergence", "reverse-V7", build(7), call("reverse"),
             floor=_vocab_floor("logits", "ref_logits"), compile=True, **common),
        Case("kl_divergence", "forward-T0.7-V33-mask", build(33, mask=True),
             call("forward", temperature=0.7),
             floor=_vocab_floor("logits", "ref_logits", temperature=0.7),
             dtypes=(torch.float32, torch.bfloat16, torch.float16), **common),
        Case("kl_divergence", "jsd0.3-V33-mask", build(33, mask=True), call("jsd", beta=0.3),
             floor=_vocab_floor("logits", "ref_logits"), **common),
        Case("kl_divergence", "reverse-V50257-mask", build(50257, mask=True),
             call("reverse"), floor=_vocab_floor("logits", "ref_logits"), big=True, **common),
        # issue 21: the f-divergences beyond KL (alpha near 1 and inside; total variation)
        Case("kl_divergence", "alpha0.3-T0.7-V33-mask", build(33, mask=True),
             call("alpha", alpha=0.3, temperature=0.7),
             floor=_vocab_floor("logits", "ref_logits", temperature=0.7), **common),
        Case("kl_divergence", "alpha0.9-V7", build(7), call("alpha", alpha=0.9),
             floor=_vocab_floor("logits", "ref_logits"), **common),
        Case("kl_divergence", "tv-V33-mask", build(33, mask=True), call("tv"),
             floor=_vocab_floor("logits", "ref_logits"), **common),
    ]


def sampling_support_cases() -> List[Case]:
    """Not differentiable, torch only (no ``backend`` argument): int64 ids, -1 padded to the
    widest support of the call (so a row alone may be narrower: the batch-invariance test
    pads it with -1)."""
    def build(vocab):
        return lambda seed: {"logits": _logits(SHAPE, vocab, seed)}

    def check(inp, outs):
        x, ids = inp["logits"], outs[0].cpu()
        valid = ids >= 0
        # -1 only as trailing padding; every id a finite logit; the row's argmax first
        assert (valid[..., :-1] | ~valid[..., 1:]).all(), ids
        at = x.gather(-1, ids.clamp_min(0))
        assert torch.isfinite(at[valid]).all(), "a -inf logit in the support"
        assert torch.equal(ids[..., 0], x.double().argmax(-1)), ids

    common = dict(primary=("logits",), rows_in={"logits": 0}, rows_out={0: 0},
                  pad=lambda inp: Pad(check=check))
    return [
        Case("sampling_support", "top_k3-top_p0.9-V7", build(7),
             lambda i, b: (rk.sampling_support(i["logits"], top_k=3, top_p=0.9),), **common),
        Case("sampling_support", "top_p0.8-T0.7-V33", build(33),
             lambda i, b: (rk.sampling_support(i["logits"], top_p=0.8, temperature=0.7),),
             **common),
    ]


# ----------------------------------------------------------------------- policy-loss ops

PB, PT = 3, 5    # [B, T] of the policy cases; sequence 1 fully masked
GB, GT = 3, 3    # [B, T] of grpo_loss (N = 9 logits rows); sequence 1 fully masked


def _policy_data(g, b, t, logp: Tensor, adv_bt: bool):
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[:, 0] = True
    mask[1] = False                           # a fully masked sequence
    old = logp + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    adv = torch.randn((b, t) if adv_bt else (b,), generator=g, dtype=F64)
    ref = old + 0.2 * torch.randn(b, t, generator=g, dtype=F64)
    isw = 0.5 + torch.rand(b, t, generator=g, dtype=F64)
    return dict(old_logp=old, advantages=adv, mask=mask, ref_logp=ref, is_weights=isw)


def _metrics_tuple(loss, metrics):
    return (loss, *(metrics[k] for k in sorted(metrics)))


def policy_loss_cases() -> List[Case]:
    def build(adv_bt=False):
        def b(seed):
            g = _gen(seed)
            logp = -3.0 * torch.rand(PB, PT, generator=g, dtype=F64)
            out = {"logp": logp, **_policy_data(g, PB, PT, logp, adv_bt)}
            out["entropy"] = 3.0 * torch.rand(PB, PT, generator=g, dtype=F64)
            return out
        return b

    def call(**kw):
        def f(i, b):
            extra = {}
            opts = dict(kw)
            if opts.pop("ref", False):
                extra["ref_logp"] = i["ref_logp"]
            if opts.pop("ent", False):
                extra["entropy"] = i["entropy"]
            if opts.pop("isw", False):
                extra["is_weights"] = i["is_weights"]
            return _metrics_tuple(*rk.policy_loss(i["logp"], i["old_logp"], i["advantages"],
                                                  i["mask"], backend=b, **extra, **opts))
        return f

    def pad(inp):
        off = ~inp["mask"]
        return Pad(zero_grad={"logp": off, "entropy": off},
                   poison=[("logp", off, 1e4), ("old_logp", off, -1e4),
                           ("ref_logp", off, float("nan")), ("entropy", off, float("nan")),
                           ("is_weights", off, float("nan"))],
                   keep_out={j: None for j in range(16)},
                   keep_grad={"logp": ~off, "entropy": ~off})

    rows = {"logp": 0, "old_logp": 0, "advantages": 0, "mask": 0, "ref_logp": 0,
            "entropy": 0, "is_weights": 0}
    common = dict(primary=("logp", "old_logp", "advantages", "ref_logp", "entropy",
                           "is_weights"), diff=("logp", "entropy"), pad=pad)
    return [
        Case("policy_loss", "ppo", build(), call(), compile=True, **common),
        Case("policy_loss", "gspo-kl-entropy-normalizer", build(),
             call(ratio_level="sequence", clip_low=0.03, clip_high=0.04, ref=True,
                  kl_coef=0.1, ent=True, entropy_coef=0.01, agg="seq-mean-token-mean",
                  normalizer=2.0),
             rows_in=rows, **common),
        Case("policy_loss", "cispo-isw-dual-advBT-normalizer", build(adv_bt=True),
             call(loss="cispo", clip_high=0.28, isw=True, ref=True, kl_coef=0.05,
                  kl_estimator="k3+", agg="seq-mean-token-sum", normalizer=3.0),
             rows_in=rows, **common),
        Case("policy_loss", "ppo-dual-delta-tokenmean-normalizer", build(),
             call(clip_high=0.28, dual_clip=2.0, delta=1.5, normalizer=11.0, ent=True,
                  entropy_coef=0.02),
             rows_in=rows, **common),
        # the losses of issue 21 (SPEC 6); a normalizer keeps the per-row ones batch
        # invariant; clip_cov / kl_cov select tokens over the batch: no rows_in
        Case("policy_loss", "sapo-taus-isw-k3_is-normalizer", build(),
             call(loss="sapo", tau_pos=0.8, tau_neg=2.0, isw=True, ref=True, kl_coef=0.1,
                  kl_estimator="k3_is", normalizer=3.0),
             rows_in=rows, **common),
        Case("policy_loss", "gmpo-isw-advBT-normalizer", build(adv_bt=True),
             call(loss="gmpo", clip_low=0.1, clip_high=0.3, isw=True, normalizer=3.0),
             rows_in=rows, **common),
        Case("policy_loss", "clip_cov", build(),
             call(loss="clip_cov", clip_cov_ratio=0.3, clip_cov_lb=-1.0, clip_cov_ub=2.0),
             **common),
        Case("policy_loss", "kl_cov-ent", build(adv_bt=True),
             call(loss="kl_cov", kl_cov_ratio=0.3, kl_cov_coef=0.5, ent=True,
                  entropy_coef=0.01),
             **common),
        Case("policy_loss", "dppo_kl-trunc-normalizer", build(),
             call(loss="dppo_kl", clip_low=0.01, clip_high=0.05, dual_clip=1.3,
                  normalizer=11.0),
             rows_in=rows, **common),
        Case("policy_loss", "dppo_tv-isw-normalizer", build(adv_bt=True),
             call(loss="dppo_tv", clip_low=0.05, clip_high=0.05, isw=True, normalizer=11.0),
             rows_in=rows, **common),
        Case("policy_loss", "dro-k3_is_sg-normalizer", build(),
             call(loss="dro", dro_beta=0.5, ref=True, kl_coef=0.2, kl_estimator="k3_is_sg",
                  normalizer=11.0),
             rows_in=rows, **common),
        Case("policy_loss", "vespo-isw-normalizer", build(adv_bt=True),
             call(loss="vespo", isw=True, normalizer=11.0), rows_in=rows, **common),
        Case("policy_loss", "luspo-gspo-normalizer", build(),
             call(loss="luspo", ratio_level="sequence", clip_low=0.03, clip_high=0.04,
                  normalizer=3.0),
             rows_in=rows, **common),
    ]


def grpo_loss_cases() -> List[Case]:
    def build(vocab, temperature=1.0):
        def b(seed):
            g = _gen(seed)
            x = _logits((GB, GT), vocab, seed)
            # sampled tokens (a rollout's: peaked rows mostly give their peak), so that the
            # ratios and the KL to old / ref log-probs stay of order one
            lsm = torch.log_softmax(x / temperature, -1)
            tok = torch.multinomial(lsm.exp().reshape(-1, vocab), 1, generator=g)
            tok = tok.reshape(GB, GT)
            tok[0, 2] = IGNORE                     # padding, masked
            tok[2, 1] = IGNORE                     # padding left unmasked on purpose
            logp = lsm.gather(-1, tok.clamp_min(0)[..., None])[..., 0]
            logp = torch.where(tok == IGNORE, torch.zeros_like(logp), logp)
            out = {"logits": x, "tokens": tok, **_policy_data(g, GB, GT, logp, False)}
            out["mask"][0, 2] = False
            out["mask"][2, 1] = True
            return out
        return b

    def call(temperature=1.0, **kw):
        def f(i, b):
            opts = dict(kw)
            if opts.pop("ref", False):
                opts["ref_logp"] = i["ref_logp"]
            if opts.pop("isw", False):
                opts["is_weights"] = i["is_weights"]
            return _metrics_tuple(*rk.grpo_loss(i["logits"], i["tokens"], i["old_logp"],
                                                i["advantages"], i["mask"],
                                                temperature=temperature, backend=b, **opts))
        return f

    def pad(inp):
        off = (inp["tokens"] == IGNORE) | ~inp["mask"]
        return Pad(zero_grad={"logits": off},
                   poison=[("old_logp", ~inp["mask"], -1e4),
                           ("ref_logp", ~inp["mask"], float("nan")),
                           ("is_weights", ~inp["mask"], float("nan"))],
                   keep_out={j: None for j in range(16)},
                   keep_grad={"logits": ~off})

    rows = {"logits": 0, "tokens": 0, "old_logp": 0, "advantages": 0, "mask": 0,
            "ref_logp": 0, "is_weights": 0}
    # gradients: SPEC 5's bound with no fp32 floor (as tests/ops/test_grpo.py): the per-row
    # weight of d logits is a loss coefficient / token count, well below 1
    common = dict(primary=("logits",), diff=("logits",), ints=("tokens",), pad=pad)
    return [
        Case("grpo_loss", "ppo-V7", build(7), call(), compile=True,
             **common),
        Case("grpo_loss", "gspo-kl-entropy-T0.7-V33-normalizer", build(33, 0.7),
             call(temperature=0.7, ratio_level="sequence", clip_low=0.03, clip_high=0.04,
                  ref=True, kl_coef=0.1, entropy_coef=0.01, agg="seq-mean-token-mean",
                  normalizer=2.0),
             rows_in=rows, **common),
        Case("grpo_loss", "kl-entropy-V50257-normalizer", build(50257),
             call(ref=True, kl_coef=0.1, entropy_coef=0.01, normalizer=4.0), big=True,
             rows_in=rows, **common),
        Case("grpo_loss", "cispo-isw-dual-V33-normalizer", build(33),
             call(loss="cispo", clip_high=0.28, isw=True, agg="seq-mean-token-sum-norm",
                  normalizer=7.0, entropy_coef=0.05),
             rows_in=rows, **common),
    ]


def kl_penalty_cases() -> List[Case]:
    def build(seed):
        g = _gen(seed)
        logp = -3.0 * torch.rand(PB, PT, generator=g, dtype=F64)
        ref = logp + torch.randn(PB, PT, generator=g, dtype=F64)
        ref[0, 0] = logp[0, 0] + 30.0             # a large difference (k3 = e^30 ..)
        return {"logp": logp, "ref_logp": ref}

    def call(**kw):
        return lambda i, b: (rk.kl_penalty(i["logp"], i["ref_logp"], **kw),)

    common = dict(primary=("logp", "ref_logp"), diff=("logp", "ref_logp"),
                  rows_in={"logp": 0, "ref_logp": 0}, rows_out={0: 0})
    return [
        Case("kl_penalty", "k3-clamp", build, call(estimator="k3", clamp=(-10.0, 10.0)),
             compile=True, **common),
        Case("kl_penalty", "k3+", build, call(estimator="k3+", clamp=(-10.0, 10.0)), **common),
        Case("kl_penalty", "abs", build, call(estimator="abs"), **common),
        Case("kl_penalty", "k2", build, call(estimator="k2"), **common),
    ]


# ------------------------------------------------------------------------- advantage ops

def group_advantages_cases() -> List[Case]:
    ids = torch.tensor([3, 1, 3, 0, 1, 3, 0, 7, 1, 0, 3, -5])   # 7 and -5: groups of one

    def build(seed):
        g = _gen(seed)
        r = torch.randn(12, generator=g, dtype=F64)
        r[8:12] = 0.5                          # a group of equal rewards: std 0
        return {"rewards": r, "group_index": ids.clone()}

    def with_mask(seed):
        inp = build(seed)
        m = torch.rand(12, 5, generator=_gen(seed + 1)) > 0.3
        m[2] = False                           # an empty response
        return {**inp, "mask": m}

    def with_components(seed):
        inp = with_mask(seed)
        extra = torch.randn(12, 2, generator=_gen(seed + 2), dtype=F64)
        return {**inp, "rewards": torch.cat([inp["rewards"][:, None], extra], 1)}

    def sized(method, mask=False, **kw):
        return lambda i, b: (rk.group_advantages(i["rewards"], group_size=4, method=method,
                                                 mask=i["mask"] if mask else None, backend=b,
                                                 **kw),)

    def indexed(method, mask=False, **kw):
        return lambda i, b: (rk.group_advantages(i["rewards"], group_index=i["group_index"],
                                                 method=method, mask=i["mask"] if mask else None,
                                                 backend=b, **kw),)

    def pad_sized(inp):  # the group of equal rewards has advantage exactly 0
        z = torch.zeros(12, dtype=torch.bool)
        z[8:12] = True
        return Pad(zero_out={0: z})

    def pad_indexed(inp):  # groups of one member have advantage exactly 0
        gi = inp["group_index"]
        single = torch.tensor([int((gi == v).sum()) == 1 for v in gi])
        return Pad(zero_out={0: single})

    def last_group(inp):
        return list(range(8, 12))

    def group_of_three(inp):
        gi = inp["group_index"]
        return [j for j in range(12) if int(gi[j]) == 3]

    common = dict(primary=("rewards",))
    return [
        Case("group_advantages", "grpo-size4", build, sized("grpo"), pad=pad_sized,
             rows_in={"rewards": 0}, rows_out={0: 0}, take=last_group, compile=True,
             **common),
        Case("group_advantages", "rloo-index", build, indexed("rloo"), pad=pad_indexed,
             ints=("group_index",), rows_in={"rewards": 0, "group_index": 0},
             rows_out={0: 0}, take=group_of_three, **common),
        Case("group_advantages", "dr_grpo-biased-size4", build,
             sized("dr_grpo", unbiased=False), pad=pad_sized, rows_in={"rewards": 0},
             rows_out={0: 0}, take=last_group, **common),
        Case("group_advantages", "grpo-index", build, indexed("grpo", eps=1e-4),
             pad=pad_indexed, ints=("group_index",),
             rows_in={"rewards": 0, "group_index": 0}, rows_out={0: 0}, take=group_of_three,
             **common),
        # batch_std: the scale is the std of the whole batch, no batch invariance to check
        Case("group_advantages", "batch_std-size4", build, sized("batch_std"),
             **common),
        # verl's other estimators (tests/ops/test_advantage_estimators.py has their formulas)
        Case("group_advantages", "opo-index", with_mask, indexed("opo", mask=True),
             pad=pad_indexed, ints=("group_index",),
             rows_in={"rewards": 0, "group_index": 0, "mask": 0}, rows_out={0: 0},
             take=group_of_three, **common),
        Case("group_advantages", "grpo_passk-size4", build, sized("grpo_passk"),
             pad=pad_sized, rows_in={"rewards": 0}, rows_out={0: 0}, take=last_group,
             **common),
        # gpg (batch count of non-zero rewards), the whitened methods: batch-wide, no rows
        Case("group_advantages", "gpg-index", build, indexed("gpg"), pad=pad_indexed,
             ints=("group_index",), **common),
        Case("group_advantages", "rf++baseline-size4", with_mask,
             sized("reinforce_plus_plus_baseline", mask=True), **common),
        Case("group_advantages", "gdpo-index", with_components,
             indexed("gdpo", mask=True, reward_weights=[1.0, 0.5, 2.0]),
             ints=("group_index",), **common),
    ]


def masked_whiten_cases() -> List[Case]:
    def build(float_mask):
        def b(seed):
            g = _gen(seed)
            v = 1.0 + 2.0 * torch.randn(3, 7, generator=g, dtype=F64)
            m = torch.rand(3, 7, generator=g) > 0.3
            m[2] = False
            if float_mask:
                m = m.double() * torch.where(torch.rand(3, 7, generator=g) > 0.5, 1.0, 0.5)
            return {"values": v, "mask": m}
        return b

    def pad(inp):
        off = inp["mask"] == 0
        # every position is whitened (masked ones are not zeroed), but masked values take
        # no part in the statistics: poison them, every other output and gradient is kept
        # (not the gradients: d values at valid positions rightly depends on the masked
        # outputs' upstream times (v - mean) through the statistics)
        return Pad(poison=[("values", off, float("nan"))], keep_out={0: ~off})

    # whole-tensor statistics: no row of its own, batch invariance does not apply
    common = dict(primary=("values",), diff=("values",), pad=pad)
    return [
        Case("masked_whiten", "shift", build(False),
             lambda i, b: (rk.masked_whiten(i["values"], i["mask"], backend=b),),
             compile=True, **common),
        Case("masked_whiten", "noshift-biased-floatmask", build(True),
             lambda i, b: (rk.masked_whiten(i["values"], i["mask"], shift_mean=False,
                                            unbiased=False, eps=1e-5, backend=b),),
             **common),
    ]


def _seq_build(seed, values=False):
    g = _gen(seed)
    r = torch.randn(3, 9, generator=g, dtype=F64)
    m = torch.ones(3, 9, dtype=torch.bool)
    m[0, 6:] = False                          # right padding
    m[1, 2:4] = False                         # a hole (tool tokens between turns)
    m[2] = False                              # a fully masked sequence
    out = {"rewards": r, "mask": m}
    if values:
        out["values"] = torch.randn(3, 9, generator=g, dtype=F64)
    return out


def _seq_pad(names, n_out):
    def pad(inp):
        off = inp["mask"] == 0
        return Pad(zero_out={j: off for j in range(n_out)},
                   poison=[(n, off, float("nan")) for n in names],
                   keep_out={j: None for j in range(n_out)})
    return pad


def gae_cases() -> List[Case]:
    common = dict(primary=("rewards", "values"), rows_in={"rewards": 0, "values": 0, "mask": 0},
                  rows_out={0: 0, 1: 0}, pad=_seq_pad(("rewards", "values"), 2))
    return [
        Case("gae", "g0.99-l0.95", lambda s: _seq_build(s, True),
             lambda i, b: tuple(rk.gae(i["rewards"], i["values"], i["mask"], gamma=0.99,
                                       lam=0.95, backend=b)), compile=True, **common),
        Case("gae", "g1-l1-intmask", lambda s: {**_seq_build(s, True),
                                                "mask": _seq_build(s)["mask"].long()},
             lambda i, b: tuple(rk.gae(i["rewards"], i["values"], i["mask"], backend=b)),
             **common),
    ]


def discounted_returns_cases() -> List[Case]:
    common = dict(primary=("rewards",), rows_in={"rewards": 0, "mask": 0}, rows_out={0: 0},
                  pad=_seq_pad(("rewards",), 1))
    return [
        Case("discounted_returns", "g0.9", _seq_build,
             lambda i, b: (rk.discounted_returns(i["rewards"], i["mask"], gamma=0.9,
                                                 backend=b),), compile=True, **common),
        Case("discounted_returns", "g1-floatmask",
             lambda s: {**_seq_build(s), "mask": _seq_build(s)["mask"].double()},
             lambda i, b: (rk.discounted_returns(i["rewards"], i["mask"], backend=b),),
             **common),
    ]


def discounted_advantages_cases() -> List[Case]:
    """discounted_returns with a baseline (ReMax) or whitening (REINFORCE++): outputs
    (advantages, returns), both 0 at masked positions."""
    def with_baseline(seed):
        inp = _seq_build(seed)
        return {**inp, "baseline": torch.randn(3, generator=_gen(seed + 1), dtype=F64)}

    pad = _seq_pad(("rewards",), 2)
    return [
        Case("discounted_advantages", "remax", with_baseline,
             lambda i, b: tuple(rk.discounted_returns(i["rewards"], i["mask"],
                                                      baseline=i["baseline"], backend=b)),
             primary=("rewards", "baseline"), pad=pad,
             rows_in={"rewards": 0, "mask": 0, "baseline": 0}, rows_out={0: 0, 1: 0}),
        # whitened over the batch: no batch invariance
        Case("discounted_advantages", "reinforce++-g0.9", _seq_build,
             lambda i, b: tuple(rk.discounted_returns(i["rewards"], i["mask"], gamma=0.9,
                                                      whiten=True, backend=b)),
             primary=("rewards",), pad=pad, compile=True),
    ]


# ------------------------------------------------------------------------------ linear ops

LB, LT, LH, LV = 3, 4, 13, 33


def _linear_build(seed):
    g = _gen(seed)
    hidden = torch.randn(LB, LT, LH, generator=g, dtype=F64)
    weight = torch.randn(LV, LH, generator=g, dtype=F64) / LH ** 0.5 * 2.0
    bias = 0.5 * torch.randn(LV, generator=g, dtype=F64)
    tokens = torch.randint(0, LV, (LB, LT), generator=g)
    tokens[0] = IGNORE                        # a fully padded sequence
    tokens[2, 1] = IGNORE
    with torch.no_grad():
        lp = torch.log_softmax(hidden @ weight.T + bias, -1).gather(
            -1, tokens.clamp_min(0)[..., None])[..., 0]
    lp = torch.where(tokens == IGNORE, torch.zeros_like(lp), lp)
    out = {"hidden": hidden, "weight": weight, "bias": bias, "tokens": tokens}
    out.update(_policy_data(g, LB, LT, lp, False))
    out["mask"] = out["mask"] & (tokens != IGNORE)
    out["mask"][2, 2] = True
    return out


def _linear_eps(dtype):
    """The logits are not exact inputs but an fp32 GEMM of H terms: each gradient also
    carries about H ulp (tests/ops/test_linear.py ``linear_grad_bound``)."""
    return 2.0 + LH


def linear_cases() -> List[Case]:
    def tl(i, b):
        return tuple(rk.linear_token_logprobs(i["hidden"], i["weight"], i["tokens"],
                                              bias=i["bias"], temperature=0.8,
                                              return_entropy=True, backend=b))

    def tl_nobias(i, b):
        return (rk.linear_token_logprobs(i["hidden"], i["weight"], i["tokens"], backend=b),)

    def grpo(**kw):
        def f(i, b):
            opts = dict(kw)
            if opts.pop("ref", False):
                opts["ref_logp"] = i["ref_logp"]
            return _metrics_tuple(*rk.linear_grpo_loss(
                i["hidden"], i["weight"], i["tokens"], i["old_logp"], i["advantages"],
                i["mask"], bias=i["bias"], backend=b, **opts))
        return f

    def pad_tl(n_out):
        def pad(inp):
            padded = inp["tokens"] == IGNORE
            return Pad(zero_out={j: padded for j in range(n_out)},
                       zero_grad={"hidden": padded})
        return pad

    def pad_grpo(inp):
        off = (inp["tokens"] == IGNORE) | ~inp["mask"]
        return Pad(zero_grad={"hidden": off})

    tl_rows = {"hidden": 0, "tokens": 0}
    grpo_rows = {"hidden": 0, "tokens": 0, "old_logp": 0, "advantages": 0, "mask": 0,
                 "ref_logp": 0}
    lin = dict(primary=("hidden", "weight", "bias"), diff=("hidden", "weight", "bias"),
               ints=("tokens",), eps_mult=_linear_eps)
    return [
        Case("linear_token_logprobs", "bias-entropy-T0.8", _linear_build, tl,
             rows_in=tl_rows, rows_out={0: 0, 1: 0}, pad=pad_tl(2), compile=True, **lin),
        Case("linear_token_logprobs", "nobias", _linear_build, tl_nobias, rows_in=tl_rows,
             rows_out={0: 0}, pad=pad_tl(1), **lin),
        Case("linear_grpo_loss", "ppo", _linear_build, grpo(), pad=pad_grpo, compile=True,
             **lin),
        Case("linear_grpo_loss", "gspo-kl-entropy-normalizer", _linear_build,
             grpo(ratio_level="sequence", clip_low=0.03, clip_high=0.04, ref=True,
                  kl_coef=0.1, entropy_coef=0.01, agg="seq-mean-token-mean",
                  normalizer=2.0),
             rows_in=grpo_rows, pad=pad_grpo, **lin),
    ]


def _linear_sparse_build(k):
    def build(seed):
        out = _linear_build(seed)
        with torch.no_grad():
            z = out["hidden"] @ out["weight"].T + out["bias"]
        idx = make_indices(z, k, seed=seed)
        idx[0, 1] = -1                       # a row of unused slots only
        return {"hidden": out["hidden"], "weight": out["weight"], "bias": out["bias"],
                "indices": idx}
    return build


def linear_sparse_logprobs_cases() -> List[Case]:
    def full_tail(i, b):
        return tuple(rk.linear_sparse_logprobs(i["hidden"], i["weight"], i["indices"],
                                               bias=i["bias"], return_tail=True, backend=b))

    def support(i, b):
        return (rk.linear_sparse_logprobs(i["hidden"], i["weight"], i["indices"],
                                          bias=i["bias"], normalize="support",
                                          temperature=0.8, backend=b),)

    def csr_full_tail(i, b):
        ids, off = _as_csr(i["indices"])
        lp, tail = rk.linear_sparse_logprobs(i["hidden"], i["weight"], ids, offsets=off,
                                             bias=i["bias"], return_tail=True, backend=b)
        return lp.view(i["indices"].shape), tail

    def pad(n_out):
        def f(inp):
            empty = (inp["indices"] < 0).all(-1)
            zero_out = {1: empty} if n_out > 1 else {}
            return Pad(inf_out={0: inp["indices"] < 0}, zero_out=zero_out,
                       zero_grad={"hidden": empty})
        return f

    common = dict(primary=("hidden", "weight", "bias"), diff=("hidden", "weight", "bias"),
                  ints=("indices",), rows_in={"hidden": 0, "indices": 0},
                  eps_mult=_linear_eps)
    return [
        Case("linear_sparse_logprobs", "full-tail-K5", _linear_sparse_build(5), full_tail,
             rows_out={0: 0, 1: 0}, pad=pad(2), compile=True, **common),
        Case("linear_sparse_logprobs", "support-T0.8-K4", _linear_sparse_build(4), support,
             rows_out={0: 0}, pad=pad(1), **common),
        Case("linear_sparse_logprobs", "csr-full-tail-K5", _linear_sparse_build(5),
             csr_full_tail, rows_out={0: 0, 1: 0}, pad=pad(2), **common),
    ]


# ---------------------------------------------------------------------- rollout correction

RB, RT = 4, 7   # [B, T]; sequence 2 fully masked, position (1, 3) valid (the NaN tests)


def _rollout_build(float_mask=False):
    def build(seed):
        g = _gen(seed)
        old = -3.0 * torch.rand(RB, RT, generator=g, dtype=F64)
        roll = old + 0.3 * torch.randn(RB, RT, generator=g, dtype=F64)
        mask = torch.rand(RB, RT, generator=g) > 0.25
        mask[:, 3] = True
        mask[2] = False
        adv = torch.randn(RB, generator=g, dtype=F64)
        m = mask.double() * (0.5 + torch.rand(RB, RT, generator=g, dtype=F64)) if float_mask \
            else mask
        return dict(old_logp=old, rollout_logp=roll, mask=m, advantages=adv)
    return build


def rollout_correction_cases() -> List[Case]:
    def call(**kw):
        def f(i, b):
            opts = dict(kw)
            if opts.pop("adv", False):
                opts["advantages"] = i["advantages"]
            w, keep, metrics = rk.rollout_correction(i["old_logp"], i["rollout_logp"],
                                                     i["mask"], backend=b, **opts)
            # keep as 0/1 plus 0 * w: exact flags that also carry a NaN weight of their
            # position (the row properties look for the NaN of a NaN row in every row
            # output; a bool cannot hold one)
            return (w, keep.to(w.dtype) + 0.0 * w, *(metrics[k] for k in sorted(metrics)))
        return f

    def pad(inp):
        off = inp["mask"] == 0
        # every output (weights, keep, every metric) keeps its bits whatever is at the
        # masked positions (SPEC 6: metrics never see values at masked positions)
        return Pad(zero_out={0: off, 1: off},
                   poison=[("old_logp", off, float("nan")), ("rollout_logp", off, NEG_INF)],
                   keep_out={j: None for j in range(17)})

    rows = {"old_logp": 0, "rollout_logp": 0, "mask": 0, "advantages": 0}
    common = dict(primary=("old_logp", "rollout_logp"), pad=pad)
    return [
        Case("rollout_correction", "token-truncate-token_k1", _rollout_build(),
             call(threshold_high=1.5, threshold_low=0.7, reject="token_k1",
                  reject_threshold=(0.8, 1.25)),
             rows_in=rows, rows_out={0: 0, 1: 0}, compile=True, **common),
        Case("rollout_correction", "sequence-truncate-seq_sum_k3-opsm", _rollout_build(),
             call(level="sequence", threshold_high=3.0, reject="seq_sum_k3,opsm",
                  reject_threshold={"seq_sum_k3": 0.15, "opsm": 0.02}, adv=True),
             rows_in=rows, rows_out={0: 0, 1: 0}, **common),
        # mask mode zeroes a NaN weight (no NaN to see in its row): no row properties
        Case("rollout_correction", "geometric-mask-seq_mean_k1-floatmask",
             _rollout_build(float_mask=True),
             call(level="geometric", mode="mask", threshold_high=1.2, threshold_low=0.8,
                  reject="seq_mean_k1", reject_threshold=(0.9, 1.1)),
             primary=("old_logp", "rollout_logp", "mask"), pad=pad),
    ]


CASES: List[Case] = [
    *token_logprobs_cases(), *entropy_cases(), *sparse_logprobs_cases(), *sparse_kl_cases(),
    *kl_divergence_cases(), *sampling_support_cases(), *kl_penalty_cases(),
    *policy_loss_cases(), *grpo_loss_cases(),
    *group_advantages_cases(), *masked_whiten_cases(), *gae_cases(),
    *discounted_returns_cases(), *discounted_advantages_cases(), *linear_cases(),
    *linear_sparse_logprobs_cases(),
    *rollout_correction_cases(),
]
PUBLIC_OPS = sorted({c.op for c in CASES})
