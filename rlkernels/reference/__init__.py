"""The ``torch`` backend: readable PyTorch, the ground truth every other backend is checked
against.

Memory stays bounded: vocabulary ops walk the rows in chunks of about ``CHUNK_ELEMENTS``
logits (:func:`row_chunks`), so no ``[N, V]`` temporary exists besides the returned gradient,
and backward recomputes the softmax from the saved fp32 log-sum-exp of each row.
"""

from __future__ import annotations

import torch

# Logits processed at once; each chunk holds a few fp32 temporaries of this many elements.
CHUNK_ELEMENTS = 1 << 22


def rows_per_chunk(vocab: int) -> int:
    """Rows of ``vocab`` logits that make one chunk of about ``CHUNK_ELEMENTS``."""
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def row_chunks(n_rows: int, vocab: int):
    """Slices that cover ``range(n_rows)`` with about ``CHUNK_ELEMENTS`` logits each.

    Results never depend on the chunking: every reduction is along the vocabulary of one row.
    """
    step = rows_per_chunk(vocab)
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs compute in fp64, everything else in fp32 (SPEC section 1)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
