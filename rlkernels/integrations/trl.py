"""One-line use of rlkernels inside TRL: ``patch()`` / ``unpatch()``.

``patch()`` replaces, in ``trl.trainer.utils`` and in every already-imported ``trl.*`` module
that holds a reference to them (``from .utils import selective_log_softmax``):

* ``selective_log_softmax(logits, index, temperature=1.0, row_mask=None)`` ->
  :func:`rlkernels.token_logprobs` for an index of shape ``(...)`` and
  :func:`rlkernels.sparse_logprobs` (``normalize="full"``) for ``(..., K)``;
* ``entropy_from_logits(logits, chunk_size=128)`` -> :func:`rlkernels.entropy`
  (``chunk_size`` is accepted and ignored: rlkernels bounds its memory itself);
* ``selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True,
  temperature=1.0, row_mask=None)`` -> one ``token_logprobs(..., return_entropy=True)`` pass;
* ``_ChunkedLogProbFunction`` (TRL >= 1.x: the fused LM head that the GRPO, RLOO, SFT, DPO and
  KTO trainers install with ``add_fused_lm_head``) -> rlkernels' lm_head kernels
  (:class:`ChunkedLogProbFunction`), for every output TRL offers (``log_probs``, ``entropy``,
  ``log_sum_sq_probs``, ``mean_logits``, ``is_top1``) and option (``final_logit_softcapping``,
  ``logit_scale``, temperature): TRL's own kernel is never called.

``unpatch()`` puts the original objects back (identity, not copies), including in ``trl``
modules imported after ``patch()``.

Semantics and dtypes, kept exactly as TRL's:

* Outputs have TRL's dtype: the dtype of ``logits`` (TRL's torch fallback computes
  ``log_softmax`` in the logits dtype, so bf16 logits give bf16 log-probs). rlkernels computes
  in fp32 and casts the result back, so a bf16 result is the correctly rounded value (TRL's bf16
  path may differ from it by a few bf16 ulp: 2 were seen). The fused LM head returns fp32 like
  TRL's.
* ``temperature`` is fused (``z = logits / T`` in fp32; TRL divides in the logits dtype).
* ``row_mask``: positions where it is 0 give 0, as in TRL.
* Every index is a real token, as in TRL (whose ``torch.gather`` raises on an id outside
  ``[0, V)``): rlkernels' padding conventions (``ignore_index=-100`` gives 0 in
  ``token_logprobs``, ``-1`` marks an unused slot in ``sparse_logprobs``) are switched off, and
  an id outside ``[0, V)`` (``-100`` and ``-1`` included), for an index of shape ``(...)`` or
  ``(..., K)``, raises ``ValueError`` naming the id instead of giving 0 or ``-inf``. On a CPU
  tensor, or with ``rlkernels.set_debug(True)``, this check runs on the host; on a GPU it is a
  device-side assertion (``torch._assert_async``: no host sync, and like TRL's ``gather`` on a
  GPU, a bad id aborts the CUDA context).
* Inputs the log-prob helpers do not take (an index whose leading dims differ from the
  logits', an integer dtype other than int32/int64, logits that are not floating point) are
  passed to TRL's original function.
"""

from typing import Optional

import torch

import rlkernels

from .. import _checks
from ..ops.linear import _linear_token_stats
from . import _ModulePatcher

__all__ = ["patch", "unpatch", "is_patched", "selective_log_softmax", "entropy_from_logits",
           "selective_log_softmax_and_entropy"]

_NO_IGNORE = -(2 ** 62)  # an ignore_index no vocabulary id can equal
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int32, torch.int64)
_patcher = _ModulePatcher("trl")


def _original(name):
    orig = _patcher.originals.get(name)
    if orig is None:
        import trl.trainer.utils as tu
        orig = getattr(tu, name)
    return orig


def _check_ids(index: torch.Tensor, vocab: int) -> None:
    """TRL gathers every id of ``index``: any id outside ``[0, vocab)`` is an error, never a
    padding slot (see the module docstring for where the check runs)."""
    if index.numel() == 0:
        return
    if index.device.type == "cpu" or _checks.debug_enabled():
        bad = (index < 0) | (index >= vocab)
        if bool(bad.any()):
            raise ValueError(f"index: expected ids in [0, {vocab}) (TRL's selective_log_softmax "
                             f"has no padding id), got {int(index[bad].flatten()[0])} "
                             f"({int(bad.sum())} id(s) out of range)")
    else:
        torch._assert_async(((index >= 0) & (index < vocab)).all(),
                            f"index: expected ids in [0, {vocab}) (TRL's selective_log_softmax "
                            f"has no padding id)")


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0,
                          row_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """TRL's ``selective_log_softmax`` on rlkernels: ``log_softmax(logits / T)`` gathered at
    ``index`` (shape ``(...)`` or ``(..., K)``), in the dtype of ``logits``."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if logits.dtype not in _FLOATS or index.dtype not in _INTS:
        return _original("selective_log_softmax")(logits, index, temperature, row_mask)
    if index.ndim == logits.ndim - 1 and index.shape == logits.shape[:-1]:
        _check_ids(index, logits.shape[-1])
        out = rlkernels.token_logprobs(logits, index, temperature=temperature,
                                       ignore_index=_NO_IGNORE)
    elif index.ndim == logits.ndim and index.shape[:-1] == logits.shape[:-1]:
        _check_ids(index, logits.shape[-1])
        out = rlkernels.sparse_logprobs(logits, index, temperature=temperature, normalize="full")
    else:
        return _original("selective_log_softmax")(logits, index, temperature, row_mask)
    out = out.to(logits.dtype)
    if row_mask is not None:
        out = out.masked_fill(row_mask == 0, 0.0)
    return out


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """TRL's ``entropy_from_logits`` on rlkernels (``chunk_size`` ignored), in the dtype of
    ``logits``."""
    if logits.dtype not in _FLOATS:
        return _original("entropy_from_logits")(logits, chunk_size)
    return rlkernels.entropy(logits).to(logits.dtype)


def selective_log_softmax_and_entropy(logits: torch.Tensor, index: torch.Tensor,
                                      entropy_requires_grad: bool = True,
                                      temperature: float = 1.0,
                                      row_mask: Optional[torch.Tensor] = None):
    """TRL's ``selective_log_softmax_and_entropy``: both outputs from one pass over the logits."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if (logits.dtype not in _FLOATS or index.dtype not in _INTS
            or index.shape != logits.shape[:-1]):
        return _original("selective_log_softmax_and_entropy")(
            logits, index, entropy_requires_grad, temperature, row_mask)
    _check_ids(index, logits.shape[-1])
    logp, ent = rlkernels.token_logprobs(logits, index, temperature=temperature,
                                         ignore_index=_NO_IGNORE, return_entropy=True)
    logp, ent = logp.to(logits.dtype), ent.to(logits.dtype)
    if not entropy_requires_grad:
        ent = ent.detach()
    if row_mask is not None:
        logp = logp.masked_fill(row_mask == 0, 0.0)
        ent = ent.masked_fill(row_mask == 0, 0.0)
    return logp, ent


# TRL's ``trl.kernels.chunked_logprob.OPTIONAL_OUTPUTS``: its default ``outputs``
_TRL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


class ChunkedLogProbFunction:
    """Stand-in for ``trl.kernels.ChunkedLogProbFunction`` (``.apply`` with the same arguments
    and defaults), on :func:`rlkernels.ops.linear._linear_token_stats`; never TRL's kernel.

    Returns ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`` ``[N]`` (fp32,
    ``is_top1`` bool), an output ``None`` when its name is not in ``outputs`` (``log_probs`` is
    always computed; by default, as in TRL, every output is). Logits: ``z = c tanh(s y / c) /
    T`` with ``y = hidden @ weight^T + bias``, ``s = logit_scale`` and ``c =
    final_logit_softcapping`` (``z = s y / T`` when it is ``None``; TRL reads a cap of 0 as 1,
    and so does this). ``log_sum_sq_probs = log sum_v p_v^2``, ``mean_logits`` the mean of ``z``
    over the vocabulary, ``is_top1`` whether the target is the first arg-max of ``z``; only
    ``log_probs`` and ``entropy`` carry gradients, as in TRL. The projection runs in the
    autocast dtype when autocast is on (as in TRL), in the dtype of ``hidden`` otherwise, with
    fp32 accumulation and no ``[N, V]`` logits (``chunk_size`` is accepted and ignored).
    """

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size,
              final_logit_softcapping=None, logit_scale=1.0, outputs=_TRL_OUTPUTS):
        device = hidden.device.type
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else hidden.dtype)
        softcap = (None if final_logit_softcapping is None
                   else final_logit_softcapping or 1.0)
        extras = any(name in outputs for name in _TRL_OUTPUTS[1:])
        with torch.autocast(device, enabled=False):
            res = _linear_token_stats(
                hidden.to(dtype), weight.to(dtype), targets, temperature=temperature,
                bias=None if bias is None else bias.to(dtype), ignore_index=_NO_IGNORE,
                return_entropy="entropy" in outputs, logit_scale=logit_scale, softcap=softcap,
                extras=extras)
        names = ("log_probs", *_TRL_OUTPUTS)
        return tuple(None if x is None or (name != "log_probs" and name not in outputs)
                     else x if x.dtype == torch.bool else x.float()
                     for name, x in zip(names, res))


def _pairs():
    import trl.trainer.utils as tu
    names = {"selective_log_softmax": selective_log_softmax,
             "entropy_from_logits": entropy_from_logits,
             "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
             "_ChunkedLogProbFunction": ChunkedLogProbFunction}
    return {n: (getattr(tu, n), r) for n, r in names.items() if hasattr(tu, n)}


def patch() -> None:
    """Route TRL's log-prob / entropy helpers and fused LM head through rlkernels. Idempotent.

    Also patches the name ``ChunkedLogProbFunction`` wherever a ``trl`` module holds TRL's
    class (e.g. ``trl.kernels``)."""
    import trl.trainer.utils  # noqa: F401  (imports the trainers' helpers)
    _patcher.patch(_pairs())


def unpatch() -> None:
    """Restore TRL's original objects exactly. A no-op when not patched."""
    _patcher.unpatch()


def is_patched() -> bool:
    return _patcher.active
