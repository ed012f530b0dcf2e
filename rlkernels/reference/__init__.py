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


def rows(x: torch.Tensor, strided: bool = False) -> torch.Tensor:
    """``[..., V] -> [N, V]``: a view when the leading dims merge. Otherwise, with
    ``strided`` (the backend's kernels read rows through two strides), a ``[A, B, V]`` view
    when the leading dims merge into two: ``logits[:, :-1]`` of ``[B, T, V]`` logits (the
    TRL / verl call) reaches the kernels without a copy. Else one copy."""
    shape = x.shape
    if len(shape) == 2:
        return x
    v = shape[-1]
    try:
        return x.view(-1, v)
    except RuntimeError:
        pass
    if strided:
        for split in range(1, x.dim() - 1):
            try:
                return x.view(*_merged(x.shape[:split]), *_merged(x.shape[split:-1]), v)
            except RuntimeError:
                continue
    return x.reshape(-1, v)


def _merged(shape) -> tuple:
    n = 1
    for d in shape:
        n *= d
    return (n,)


def as_rows(x):
    """``[..., C] -> [N, C]`` (``x`` itself when 2-d, or None): the rows of an input given in
    its public shape (``ND_ROWS`` modules); a copy only when the leading dims do not merge."""
    return x if x is None or x.dim() == 2 else x.reshape(-1, x.shape[-1])


def as_flat(x):
    """``[...] -> [N]`` (``x`` itself when 1-d, or None): a per-row input in public shape."""
    return x if x is None or x.dim() == 1 else x.reshape(-1)


def leading(x: torch.Tensor, lead: tuple, *trailing: int) -> torch.Tensor:
    """A per-row result ``[N, *trailing]`` in the inputs' leading shape ``[*lead,
    *trailing]`` (``x`` itself when ``lead`` is one dim: the ``[N, V]`` call)."""
    return x if len(lead) == 1 else _own_view(x, (*lead, *trailing))


def _own_view(x: torch.Tensor, shape: tuple) -> torch.Tensor:
    """``x.view(shape)`` of a tensor the kernel made and drops, as a tensor of its own to
    autograd: a view made inside the eager ops' ``autograd.Function`` would be an output that
    autograd forbids changing in place (``logp.masked_fill_(...)``), which ``[N, V]``
    kernels' outputs allow."""
    with torch._C._AutoDispatchBelowADInplaceOrView():
        return x.view(shape)


def head_outputs(out, lead: tuple):
    """``(logp [N], entropy [N], stats [N, 3])`` of an lm_head kernel in the leading shape
    ``lead`` of its ``hidden [..., H]``."""
    logp, ent, stats = out
    return leading(logp, lead), leading(ent, lead), leading(stats, lead, 3)


def grad_in_shape(grad: torch.Tensor, shape, out=None) -> torch.Tensor:
    """The ``[N, V]`` gradient ``grad`` in the input's ``shape``; with ``out`` (in-place
    backward), ``out`` itself, holding it (copied back when ``out``'s rows were a copy)."""
    if out is None:
        return grad if len(shape) == 2 else _own_view(grad, shape)
    if grad.data_ptr() != out.data_ptr():
        out.copy_(grad.view(shape))
    return out


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs compute in fp64, everything else in fp32 (SPEC section 1)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
