"""The row selection of the fused lm_head ops (``rows=``, issue 20): only the selected rows
of ``hidden`` go through the GEMMs (e.g. the response tokens: verl #7686 projects the head
only for them), the others get the outputs of padding rows (0) and no gradient.

Shared by every backend's kernel functions: the selection is gathered on device
(``index_select``), the kernel runs on ``R`` rows, and its per-row results are scattered back
into zeros with ``index_copy_`` (no atomics: with distinct indices every position is written
once, so the result is deterministic). No host sync anywhere.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

Tensor = torch.Tensor


def _take(rows: Tensor, x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.index_select(0, rows)


def _put(rows: Tensor, n: int, x: Tensor) -> Tensor:
    """``x [R, ...]`` at ``rows`` of an ``[n, ...]`` tensor of zeros."""
    return x.new_zeros((n,) + tuple(x.shape[1:])).index_copy_(0, rows, x)


def forward(fn: Callable, rows: Tensor, hidden: Tensor, tokens: Tensor) -> Tuple[Tensor, ...]:
    """``fn(hidden[rows], tokens[rows])`` (per-row outputs ``[R, ...]``) scattered to ``N``
    rows, zeros elsewhere (a padding row's outputs: log-prob, entropy and statistics 0)."""
    n = hidden.shape[0]
    return tuple(_put(rows, n, x) for x in fn(_take(rows, hidden), _take(rows, tokens)))


def backward(fn: Callable, rows: Tensor, grad_logp: Optional[Tensor],
             grad_entropy: Optional[Tensor], hidden: Tensor, tokens: Tensor, stats: Tensor
             ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``fn(grad_logp[rows], grad_entropy[rows], hidden[rows], tokens[rows], stats[rows])`` ->
    ``(d hidden [R, H], d weight, d bias)``; ``d hidden`` scattered to ``N`` rows (zeros at
    the rows that were not selected: they took no part in the outputs)."""
    g_h, g_w, g_b = fn(_take(rows, grad_logp), _take(rows, grad_entropy),
                       _take(rows, hidden), _take(rows, tokens), _take(rows, stats))
    return _put(rows, hidden.shape[0], g_h), g_w, g_b
