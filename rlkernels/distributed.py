"""Vocabulary (tensor) parallelism: combining per-shard row statistics with ``torch.distributed``
(SPEC section 3.5).

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

``linear_token_logprobs`` (:func:`linear_token_logprobs_forward`): ``weight [V_local, H]``
(and ``bias``) is this rank's shard of the lm_head and ``hidden`` is replicated. The backend's
fused kernel gives the shard's row statistics and, for a token it holds, ``log p_local = (z_y
- m_r) - log s_r``, so ``z_y - M = log p_local + log s_r + (m_r - M)`` replaces the gathered
logit of step 3 (no logit is ever materialized). Backward: ``d weight`` and ``d bias`` are
this rank's shards, local; ``d hidden = sum_r d z_r W_r`` runs over every shard, so it is the
one quantity that needs communication: ONE ``all_reduce(SUM)`` of ``d hidden`` in backward
(:func:`all_reduce_sum`), after which every rank holds the unsharded ``d hidden`` (skipped
when ``hidden`` needs no gradient).

``grpo_loss`` / ``linear_grpo_loss``: the per-token log-probs and entropies above are those
of the unsharded op on every rank, so the policy loss (a function of per-token values only)
is computed identically, and redundantly, on every rank. Its per-token gradients ``g_lp``,
``g_H`` are then pushed through the local backward: ``d z = g_lp (onehot(y) - p) - g_H p (z -
sum p z)`` on this shard's columns.

``kl_divergence`` (:func:`kl_divergence_forward`), ``p = softmax(z)``, ``q = softmax(w)``,
both shards holding the same columns. Every kind is a sum over columns of a per-column term
``t_j = p_j a_p,j + q_j a_q,j`` that depends only on ``log p_j``, ``log q_j`` (``a_p = log p -
log q``, ``a_q = 0`` for reverse; ``a_p = 0``, ``a_q = log q - log p`` for forward; ``a_p =
beta (log p - log m)``, ``a_q = (1 - beta) (log q - log m)``, ``log m = logaddexp(log beta +
log p, log(1 - beta) + log q)`` for jsd). With the global ``log p_j = (z_j - M_p) - log s_p``
(likewise ``q``), ``KL = sum_r sum_{j in r} t_j`` splits exactly over shards:

1. each shard's ``(m, log s)`` of ``z`` and of ``w`` (``token_logprobs_forward`` with no
   tokens); one ``all_gather`` of both maxima and one ``all_reduce`` of both ``REST`` give the
   global ``(M_p, log s_p)`` and ``(M_q, log s_q)``, as in step 2 and 3 above;
2. the backend's ``kl_divergence_partial_forward`` (the second pass of the unsharded kernel,
   on the given statistics) sums ``S_p = sum p a_p`` and ``S_q = sum q a_q`` over this shard's
   columns; one ``all_reduce`` gives the global sums and ``KL = S_p + S_q``.

Each column's term is computed exactly as the unsharded op computes it; only the order of the
sums changes. (A one-pass form, rescaling each shard's own-normalized KL with the chain rule
``KL(p||q) = sum_r P_r (KL(p_r||q_r) + log(P_r / Q_r))``, would save the second pass but has
no counterpart for the JSD, whose mixture weights change per shard.) Backward needs ``log p``,
``log q`` and the row sums of the softmax VJPs, ``sum p a_p = S_p`` and ``sum q a_q = S_q``:
the global values are saved in the third columns of ``stats_p`` / ``stats_q``, and the
backend's backward kernel computes ``d z = p (a_p - S_p)`` (reverse, jsd) or ``p - q``
(forward), ``d w = q (a_q - S_q)`` (forward, jsd) or ``q - p`` (reverse) locally, with no
communication.

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


def _global_max(m_r: Tensor, group) -> Tuple[Tensor, Tensor, Tensor]:
    """``(M, is_owner, shift)`` for local row maxima ``m_r [..., N]``: the all-shard max, whether
    this rank is the row's owner (the first rank at the max, the same on every rank), and
    ``M`` with ``-inf`` replaced by 0 (the shift of a row of only ``-inf``). One all_gather."""
    maxima = _all_gather(m_r, group)                                   # [W, ..., N]
    big_m = maxima.amax(dim=0)
    owner = (maxima == big_m).to(torch.int8).argmax(dim=0)
    shift = torch.where(big_m == -math.inf, 0.0, big_m)
    return big_m, owner == _dist().get_rank(group), shift


def _shard_mass(m_r: Tensor, log_s_r: Tensor, shift: Tensor, is_owner: Tensor
                ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(rest term, mass, live)`` of one shard: ``mass = exp(m_r - M) s_r`` (0 for a shard of
    only ``-inf``); the rest term is what the shard adds to ``REST``: ``expm1(log s_r)`` on
    the owner (its arg-max column is the one left out), ``mass`` elsewhere."""
    live = m_r != -math.inf
    mass = torch.where(live, torch.exp(m_r - shift) * torch.exp(log_s_r), 0.0)
    return torch.where(is_owner, torch.expm1(log_s_r), mass), mass, live


def _combine(local: Tensor, token_rel: Optional[Callable[[Tensor], Tensor]],
             mine: Optional[Tensor], valid: Optional[Tensor], with_entropy: bool, group
             ) -> Tuple[Tensor, Tensor, Tensor]:
    """Steps 2 and 3 of the module docstring from this shard's row statistics ``local [N,
    3]``: ``(logp, entropy, stats)`` as :func:`token_logprobs_forward`.

    ``token_rel(shift)`` gives ``z_y - shift`` on the rows whose token this shard holds
    (``mine``); ``valid`` marks non-padding rows. Without ``token_rel`` (no tokens) ``logp``
    is all zeros and every row's entropy is kept."""
    dist = _dist()
    m_r, log_s_r, sum_pzs_r = local[:, 0], local[:, 1], local[:, 2]
    big_m, is_owner, shift = _global_max(m_r, group)
    rest, mass, live = _shard_mass(m_r, log_s_r, shift, is_owner)
    zero = torch.zeros_like(rest)
    s1 = torch.where(live, mass * (sum_pzs_r + (m_r - shift)), 0.0) if with_entropy else zero
    if token_rel is not None:
        y_rel = torch.where(mine, token_rel(shift), 0.0)
        holders = mine.to(rest.dtype)
    else:
        y_rel = holders = zero
    buf = torch.stack([rest, s1, y_rel, holders], dim=1)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    rest, s1, y_rel, holders = buf.unbind(1)

    log_s = torch.log1p(rest)
    sum_pzs = s1 / (1.0 + rest) if with_entropy else zero
    ent = log_s - sum_pzs if with_entropy else zero.clone()
    stats = torch.stack([big_m, log_s, sum_pzs], dim=1)
    if token_rel is None:
        return zero.clone(), ent, stats
    # no holder: a token id outside the whole vocabulary reads as NaN (as the triton kernel)
    logp = torch.where(holders > 0, y_rel - log_s, math.nan)
    return torch.where(valid, logp, 0.0), torch.where(valid, ent, 0.0), stats


def _split_tokens(tokens: Tensor, vocab: int, ignore_index: int, group
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(valid, mine, loc, local_tokens)``: non-padding rows, rows whose token this shard
    holds, the token in this shard's ids, and the ids backward reads (``loc`` where held,
    the sentinel ``V_local`` (``V_local + 1`` when that is ``ignore_index``) elsewhere,
    ``ignore_index`` on padding)."""
    offset, _ = shard_layout(vocab, group, tokens.device)
    tok = tokens.long()
    valid = tok != ignore_index
    loc = tok - offset
    mine = valid & (loc >= 0) & (loc < vocab)
    sentinel = vocab if vocab != ignore_index else vocab + 1
    local_tokens = torch.where(valid, torch.where(mine, loc, sentinel), ignore_index)
    return valid, mine, loc, local_tokens


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
    vocab = logits.shape[1]
    _, _, local = local_forward(logits, None, temperature, ignore_index, with_entropy)
    if tokens is None:
        _, ent, stats = _combine(local, None, None, None, with_entropy, group)
        return torch.zeros_like(ent), ent, stats, tokens_placeholder(logits)
    valid, mine, loc, local_tokens = _split_tokens(tokens, vocab, ignore_index, group)

    def token_rel(shift):
        return _scaled_token_logit(logits, torch.where(mine, loc, 0), temperature,
                                   local.dtype) - shift

    logp, ent, stats = _combine(local, token_rel, mine, valid, with_entropy, group)
    return logp, ent, stats, local_tokens


def linear_token_logprobs_forward(local_forward: Callable, hidden: Tensor, weight: Tensor,
                                  bias: Optional[Tensor], tokens: Tensor, temperature: float,
                                  ignore_index: int, with_entropy: bool, group
                                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`token_logprobs_forward` of the logits ``hidden @ weight^T + bias``, with
    ``weight [V_local, H]`` (and ``bias [V_local]``) this rank's lm_head shard.

    ``local_forward`` is the backend's ``linear_token_logprobs_forward``; it is given every
    non-padding row a token of this shard (its own, or column 0 when another shard holds it)
    so that it computes the statistics of every row and the holder's ``log p_local = (z_y -
    m_r) - log s_r``, from which ``z_y - M = log p_local + log s_r + (m_r - M)`` (with
    ``m_r = -inf`` read as 0, as the kernel's own shift) without materializing a logit."""
    vocab = weight.shape[0]
    valid, mine, loc, local_tokens = _split_tokens(tokens, vocab, ignore_index, group)
    fwd_tokens = torch.where(valid, torch.where(mine, loc, 0), ignore_index)
    logp_r, _, local = local_forward(hidden, weight, bias, fwd_tokens, temperature,
                                     ignore_index, with_entropy)
    m_r = local[:, 0]
    m_eff = torch.where(m_r == -math.inf, 0.0, m_r)

    def token_rel(shift):
        return logp_r + local[:, 1] + (m_eff - shift)

    logp, ent, stats = _combine(local, token_rel, mine, valid, with_entropy, group)
    return logp, ent, stats, local_tokens


def global_row_stats(locals_: Tuple[Tensor, ...], group) -> Tuple[Tensor, ...]:
    """The all-shard ``(M, log s, 0)`` ``[N, 3]`` of several row-statistics tensors of the same
    rows at once (one all_gather, one all_reduce for all of them)."""
    dist = _dist()
    local = torch.stack(locals_)                                       # [K, N, 3]
    big_m, is_owner, shift = _global_max(local[..., 0], group)          # [K, N]
    rest, _, _ = _shard_mass(local[..., 0], local[..., 1], shift, is_owner)
    dist.all_reduce(rest, op=dist.ReduceOp.SUM, group=group)
    log_s = torch.log1p(rest)
    out = torch.stack([big_m, log_s, torch.zeros_like(log_s)], dim=-1)
    return tuple(out.unbind(0))


def kl_divergence_forward(local_forward: Callable, partial_forward: Callable, logits: Tensor,
                          ref_logits: Tensor, ignore_mask: Optional[Tensor], kind: str,
                          beta: float, temperature: float, group
                          ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(kl [N], stats_p [N, 3], stats_q [N, 3])`` of the unsharded ``kl_divergence`` on
    every rank; ``logits`` and ``ref_logits`` are this rank's shards (the same columns).

    ``local_forward`` is the backend's ``token_logprobs_forward`` (row statistics of each
    shard), ``partial_forward`` its ``kl_divergence_partial_forward`` (this shard's part of the
    KL sums, given the global statistics). The saved statistics are global: ``(M, log s)``
    of each distribution and the all-shard sums ``sum p a_p``, ``sum q a_q``, which is what
    the backward kernel reads; the algorithm is in the module docstring."""
    dist = _dist()
    _, _, loc_p = local_forward(logits, None, temperature, -100, False)
    _, _, loc_q = local_forward(ref_logits, None, temperature, -100, False)
    stats_p, stats_q = global_row_stats((loc_p, loc_q), group)
    _, part_p, part_q = partial_forward(logits, ref_logits, ignore_mask, stats_p, stats_q,
                                        kind, beta, temperature)
    sums = torch.stack([part_p[:, 2], part_q[:, 2]], dim=1)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    stats_p = torch.cat([stats_p[:, :2], sums[:, :1]], dim=1)
    stats_q = torch.cat([stats_q[:, :2], sums[:, 1:]], dim=1)
    # kl = sum p a_p + sum q a_q for every kind (one of the two is 0 for reverse / forward)
    kl = sums[:, 0] + sums[:, 1]
    if ignore_mask is not None:
        kl = torch.where(ignore_mask, 0.0, kl)
    return kl, stats_p, stats_q


def all_reduce_sum(x: Tensor, group) -> Tensor:
    """``x`` summed over the ranks of ``group``, in place (the one reduction of a backward: the
    gradient of the replicated ``hidden`` of the lm_head ops)."""
    dist = _dist()
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def tokens_placeholder(logits: Tensor) -> Tensor:
    """The ``local_tokens`` output when there are no tokens (custom ops cannot return None)."""
    return torch.empty(0, dtype=torch.int64, device=logits.device)


__all__ = ["check_group", "register_group", "group_of", "shard_layout", "check_global_tokens",
           "token_logprobs_forward", "linear_token_logprobs_forward", "global_row_stats",
           "kl_divergence_forward", "all_reduce_sum"]
