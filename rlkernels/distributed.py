"""Vocabulary (tensor) parallelism: combining per-shard row statistics with ``torch.distributed``.

With the lm_head sharded over the vocabulary (Megatron style), rank ``r`` of the process group
holds the logits of a contiguous vocabulary slice; ranks in group order hold consecutive
slices, whose sizes may differ. Tokens are global ids.

Forward of ``token_logprobs`` / ``entropy`` (:func:`token_logprobs_forward`), with ``z =
logits / T`` and each shard's row statistics ``(m_r, log s_r, sum p_r (z - m_r))`` from the
backend's own kernel (``tokens=None``):

1. ``all_gather`` of every rank's shard size (one int64 each; this rank's vocabulary offset is
   the sum of the sizes before it, kept on device: no host synchronisation);
2. ``all_gather`` of the row maxima ``m_r`` -> global max ``M``; the *owner* of a row is the
   first rank whose ``m_r == M`` (the same on every rank);
3. one ``all_reduce(SUM)`` of four columns per row:

   * ``rest``: the owner adds its own ``rest_r = expm1(log s_r)`` (every column but one
     arg-max), the others ``exp(m_r - M) s_r``; ``log s = log1p(REST)`` keeps ``1 - p_max``
     exact on peaked rows, as the unsharded kernels do;
   * ``A = sum_r exp(m_r - M) s_r (sum p_r (z - m_r) + (m_r - M))``, the global ``sum exp(z -
     M) (z - M)``; ``sum p (z - M) = A / (1 + REST)`` and ``H = log s - sum p (z - M)``;
   * the token's logit ``z_y`` from the rank whose shard holds it (0 elsewhere), and a count
     of those ranks (0 for a token id outside the whole vocabulary: its log-prob is NaN, as
     the unsharded triton kernel reads it).

   ``logp = (z_y - M) - log s``; rows whose token is ``ignore_index`` give 0 for both outputs.
   A rank whose shard is all ``-inf`` on a row contributes 0; a row that is ``-inf`` on every
   rank has ``M = -inf``, ``log s = 0``, entropy 0 and log-prob ``-inf``, like the unsharded
   op; NaN in a row propagates to that row's outputs.

The forward returns the *global* statistics ``(M, log s, sum p (z - M))`` and the tokens in
shard-local ids, which is all backward needs: each rank's gradient shard is the unsharded
formula restricted to its columns, computed by the backend's own backward kernel, with **no
communication** (a token held by another rank is passed as the sentinel ``V_local``, "valid
row, no one-hot column here"). Differentiating *through* collectives instead would be wrong:
the gradient of an all-reduced log-sum-exp reaches every rank once per rank.

Custom ops cannot take a ``ProcessGroup`` argument, so the public functions register the group
here and pass an int handle (:func:`register_group`, :func:`group_of`).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch

Tensor = torch.Tensor

_GROUPS: Dict[int, object] = {}


def _dist():
    import torch.distributed as dist
    return dist


def check_group(name: str, group) -> None:
    """``group`` is a ``torch.distributed`` ``ProcessGroup`` of an initialized default group:
    ``TypeError`` / ``RuntimeError`` naming ``name`` otherwise."""
    dist = _dist()
    if not dist.is_available():
        raise RuntimeError(f"{name}: torch.distributed is not available in this build of "
                           f"torch, so vocabulary parallelism cannot be used")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name}: expected a torch.distributed ProcessGroup (or None), got "
                        f"{type(group).__name__}")
    if not dist.is_initialized():
        raise RuntimeError(f"{name}: torch.distributed is not initialized; call "
                           f"torch.distributed.init_process_group first")


def register_group(group) -> int:
    """An int handle for ``group`` (kept alive here) that a custom op can take as argument."""
    check_group("process_group", group)
    handle = id(group)
    _GROUPS[handle] = group
    return handle


def group_of(handle: int):
    """The group registered under ``handle``."""
    try:
        return _GROUPS[handle]
    except KeyError:
        raise RuntimeError(f"rlkernels: no process group is registered under handle {handle} "
                           f"(register_group must be called first)") from None


def _all_gather(x: Tensor, group) -> Tensor:
    """``[W, *x.shape]``: every rank's ``x``, in group order."""
    dist = _dist()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


def shard_layout(vocab_local: int, group, device) -> Tuple[Tensor, Tensor]:
    """``(offset, total)``: this rank's first global vocabulary id and the global vocabulary
    size, as 0-d int64 tensors on ``device`` (no host synchronisation)."""
    dist = _dist()
    sizes = _all_gather(torch.full((1,), vocab_local, dtype=torch.int64, device=device), group)
    sizes = sizes.view(-1)
    rank = dist.get_rank(group)
    return sizes[:rank].sum(), sizes.sum()


def check_global_tokens(name: str, tokens: Tensor, vocab_local: int, ignore_index: int,
                        group) -> None:
    """Debug mode: every token is a global id in ``[0, V_total)`` or ``ignore_index`` (one host
    synchronisation, like every debug check)."""
    from . import _checks
    _, total = shard_layout(vocab_local, group, tokens.device)
    _checks.token_range(name, tokens, int(total), ignore_index)


def _scaled_token_logit(logits: Tensor, loc: Tensor, temperature: float, cdt) -> Tensor:
    z = logits.gather(1, loc[:, None])[:, 0].to(cdt)
    return z / temperature if temperature != 1.0 else z


def token_logprobs_forward(local_forward: Callable, logits: Tensor, tokens: Optional[Tensor],
                           temperature: float, ignore_index: int, with_entropy: bool, group
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(logp [N], entropy [N], stats [N, 3], local_tokens)`` of the unsharded op, on every
    rank of ``group``; ``logits [N, V_local]`` is this rank's shard.

    ``local_forward`` is the backend's ``token_logprobs_forward``. ``stats`` are the global
    row statistics ``(M, log s, sum p (z - M))`` (the last 0 without the entropy);
    ``local_tokens [N]`` int64 are the tokens in this shard's ids, ``V_local`` (or ``V_local +
    1`` when that is ``ignore_index``) where another shard holds the token, ``ignore_index``
    on padding rows; an empty tensor when ``tokens`` is None. The module docstring states the
    algorithm."""
    dist = _dist()
    n, vocab = logits.shape
    _, _, local = local_forward(logits, None, temperature, ignore_index, with_entropy)
    cdt = local.dtype
    m_r, log_s_r, sum_pzs_r = local[:, 0], local[:, 1], local[:, 2]

    offset, _ = shard_layout(vocab, group, logits.device)
    rank = dist.get_rank(group)
    maxima = _all_gather(m_r, group)                                   # [W, N]
    big_m = maxima.amax(dim=0)
    owner = (maxima == big_m).to(torch.int8).argmax(dim=0)            # first rank at the max
    is_owner = owner == rank
    shift = torch.where(big_m == -math.inf, 0.0, big_m)
    live = m_r != -math.inf                     # a shard of only -inf contributes nothing
    mass = torch.where(live, torch.exp(m_r - shift) * torch.exp(log_s_r), 0.0)
    rest = torch.where(is_owner, torch.expm1(log_s_r), mass)
    zero = torch.zeros_like(rest)
    if with_entropy:
        s1 = torch.where(live, mass * (sum_pzs_r + (m_r - shift)), 0.0)
    else:
        s1 = zero
    if tokens is not None:
        tok = tokens.long()
        valid = tok != ignore_index
        loc = tok - offset
        mine = valid & (loc >= 0) & (loc < vocab)
        z_y = _scaled_token_logit(logits, torch.where(mine, loc, 0), temperature, cdt)
        z_y = torch.where(mine, z_y, 0.0)
        holders = mine.to(cdt)
    else:
        z_y = holders = zero
    buf = torch.stack([rest, s1, z_y, holders], dim=1)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    rest, s1, z_y, holders = buf.unbind(1)

    log_s = torch.log1p(rest)
    sum_pzs = s1 / (1.0 + rest) if with_entropy else zero
    ent = log_s - sum_pzs if with_entropy else zero.clone()
    stats = torch.stack([big_m, log_s, sum_pzs], dim=1)
    if tokens is None:
        return zero.clone(), ent, stats, tokens_placeholder(logits)
    logp = torch.where(holders > 0, (z_y - shift) - log_s, math.nan)
    logp = torch.where(valid, logp, 0.0)
    ent = torch.where(valid, ent, 0.0)
    sentinel = vocab if vocab != ignore_index else vocab + 1
    local_tokens = torch.where(valid, torch.where(mine, loc, sentinel), ignore_index)
    return logp, ent, stats, local_tokens


def tokens_placeholder(logits: Tensor) -> Tensor:
    """The ``local_tokens`` output when there are no tokens (custom ops cannot return None)."""
    return torch.empty(0, dtype=torch.int64, device=logits.device)


__all__ = ["check_group", "register_group", "group_of", "shard_layout", "check_global_tokens",
           "token_logprobs_forward"]
