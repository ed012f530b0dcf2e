"""sampling_support against a naive fp64 (numpy) top-k / top-p sampler, and the support log-probs
(sparse_logprobs(normalize="support")) against the renormalized sampler distribution.

Inputs are bf16 (exact, and far enough apart that ``x / T`` in fp32 creates no new ties), so
the ranking of the fp64 Python loop and of the kernel agree exactly. A top-p decision compares
a sum of fp32 probabilities with ``top_p``; on a row where the mass above some id is within
1e-6 of ``top_p`` either answer is right, so the check is a sandwich: the support contains
the naive support for ``top_p - 1e-6`` and is contained in the one for ``top_p + 1e-6``.
"""

import math

import pytest
import torch

import _naive as naive
import rlkernels
from _naive import assert_values_close, make_logits, needs

BAND = 1e-6


def _rows(ids: torch.Tensor):
    """Valid ids of each row, checking the layout: -1 only as trailing padding."""
    out = []
    for row in ids.reshape(-1, ids.shape[-1]).tolist():
        valid = [i for i in row if i >= 0]
        assert row[:len(valid)] == valid, f"-1 padding must be trailing, got {row}"
        assert all(i == -1 for i in row[len(valid):])
        out.append(valid)
    return out


def _check(x, top_k, top_p, temperature=1.0):
    ids = rlkernels.sampling_support(x, top_k=top_k, top_p=top_p, temperature=temperature)
    assert ids.dtype == torch.int64 and ids.device == x.device
    assert ids.shape[:-1] == x.shape[:-1]
    vocab = x.shape[-1]
    got = _rows(ids)
    flat = x.reshape(-1, vocab).double().cpu()
    wide = []
    for r, row in enumerate(flat.tolist()):
        if top_p is None:
            lo = hi = naive.sampler_support(row, top_k, None, temperature)
        else:
            lo = naive.sampler_support(row, top_k, max(top_p - BAND, 1e-12), temperature)
            hi = naive.sampler_support(row, top_k, min(top_p + BAND, 1.0), temperature)
        assert got[r] == hi[:len(got[r])], f"row {r}: not in ranked order: {got[r]} vs {hi}"
        assert len(lo) <= len(got[r]) <= len(hi), f"row {r}: {got[r]} vs [{lo}, {hi}]"
        wide.append(len(got[r]))
    if top_k is not None:
        assert ids.shape[-1] == min(top_k, vocab), "K = min(top_k, V) when top_k is given"
    else:
        assert ids.shape[-1] == max(wide + [1]), "K = the widest support of the batch"
    return ids, got


# Vocabularies: 7 (tiny, odd), 129 (just above a block), 50257 (realistic, top-p alone
# sorts the whole row).
@pytest.mark.parametrize("vocab", [7, 129, 50257])
@pytest.mark.parametrize("top_k,top_p", [(1, None), (5, None), (200, None), (None, 0.9),
                                         (None, 0.5), (40, 0.95), (3, 0.3)])
def test_sampling_support_matches_python_sampler(vocab, top_k, top_p):
    n = 4 if vocab == 50257 else 8
    x = make_logits(n, vocab, torch.bfloat16, seed=vocab)  # peaked, flat, masked rows
    _check(x, top_k, top_p)
    _check(x, top_k, top_p, temperature=0.6)


def test_sampling_support_ties_by_increasing_id():
    x = torch.tensor([[1.0, 2.0, 2.0, 1.0, 2.0]], dtype=torch.bfloat16)
    assert rlkernels.sampling_support(x, top_k=2).tolist() == [[1, 2]]
    assert rlkernels.sampling_support(x, top_k=4).tolist() == [[1, 2, 4, 0]]
    flat = torch.zeros(1, 4)
    # p = 1/4 each: mass above = 0, .25, .5, .75; top_p = 0.5 keeps the first two (exact)
    assert rlkernels.sampling_support(flat, top_p=0.5).tolist() == [[0, 1]]
    assert rlkernels.sampling_support(flat, top_p=0.51).tolist() == [[0, 1, 2]]


def test_sampling_support_excludes_minus_inf():
    x = torch.tensor([[0.0, -math.inf, 1.0, -math.inf], [-math.inf, -math.inf, -math.inf, 2.0]])
    assert rlkernels.sampling_support(x, top_k=4).tolist() == [[2, 0, -1, -1], [3, -1, -1, -1]]
    assert rlkernels.sampling_support(x, top_p=1.0).tolist() == [[2, 0], [3, -1]]
    assert rlkernels.sampling_support(x, top_k=3, top_p=0.99).tolist() == \
        [[2, 0, -1], [3, -1, -1]]


def test_sampling_support_top_p_one_keeps_every_nonzero_probability_id():
    """top_p = 1.0 keeps every id with a finite logit, even on peaked rows where the fp32
    probabilities of the tail round to nothing next to the top one."""
    x = make_logits(6, 129, torch.bfloat16, kind="peaked_masked", seed=3)
    ids = rlkernels.sampling_support(x, top_p=1.0)
    finite = torch.isfinite(x).sum(-1)
    got = _rows(ids)
    assert [len(r) for r in got] == finite.tolist()
    for r, row in enumerate(got):
        assert sorted(row) == torch.nonzero(torch.isfinite(x[r]))[:, 0].tolist()
    assert ids.shape[-1] == int(finite.max())
    both = rlkernels.sampling_support(x, top_k=10, top_p=1.0)
    assert torch.equal(both, rlkernels.sampling_support(x, top_k=10))


def test_sampling_support_shapes():
    x = make_logits(6, 33, torch.bfloat16, seed=4)
    ids = rlkernels.sampling_support(x.view(2, 3, 33), top_k=5)
    assert ids.shape == (2, 3, 5)
    assert torch.equal(ids.view(6, 5), rlkernels.sampling_support(x, top_k=5))
    one = rlkernels.sampling_support(x[0], top_k=50)  # 1-d logits, top_k > V
    assert one.shape == (33,) and torch.equal(one, rlkernels.sampling_support(x, top_k=50)[0])
    assert rlkernels.sampling_support(x[:0], top_k=3).shape == (0, 3)


@pytest.mark.parametrize("top_k,top_p,temperature", [(20, None, 1.0), (None, 0.8, 0.7),
                                                     (50, 0.95, 1.0), (1, None, 1.0)])
def test_support_logprobs_are_the_sampler_distribution(backend, device, top_k, top_p,
                                                       temperature):
    """sparse_logprobs(ids, normalize="support") = log of the sampler's renormalized
    distribution (what a top-k / top-p rollout engine reports); it sums to 1 on each row."""
    needs(backend, "sparse_logprobs", device)
    x = make_logits(8, 129, torch.bfloat16, seed=5, device=device)
    ids, got = _check(x, top_k, top_p, temperature)
    lp = rlkernels.sparse_logprobs(x, ids, temperature=temperature, normalize="support",
                                   backend=backend)
    expect = torch.full(ids.shape, -math.inf, dtype=torch.float64)
    probs = torch.softmax(x.double().cpu() / temperature, dim=-1)
    for r, row in enumerate(got):
        mass = math.fsum(float(probs[r, j]) for j in row)
        for slot, j in enumerate(row):
            expect[r, slot] = math.log(float(probs[r, j]) / mass)
    assert_values_close(lp, expect, what="support log-probs")
    total = torch.where(ids >= 0, lp.double().exp(), 0.0).sum(-1)
    assert_values_close(total, torch.ones(8, dtype=torch.float64))
