"""Values and gradients of the vocabulary ops against two references (SPEC section 5).

For each op and each backend that runs here: inputs are built in fp64, rounded once to the
low-precision dtype (so they are exact in it), and the op's outputs and gradients are compared

* with the ``torch`` backend evaluated in fp64 on the same values (the SPEC reference):
  per-token outputs within ``atol=1e-5, rtol=1e-5``, gradients within
  ``2 * eps(dtype) * max|g_ref| + 1e-7`` plus the floor of fp32 arithmetic,
  ``eps(fp32) * (max|z| + log V) * |upstream grad| / T`` (``_naive.fp32_floor``: negligible
  for bf16/fp16, dominant for fp32 logits of magnitude 20-40);
* and that fp64 reference with the naive fp64 formulas of ``tests/_naive.py`` (autograd
  through ``log_softmax`` etc.), which share no code with rlkernels.
"""

import math

import pytest
import torch

import _naive as naive
import rlkernels
from _naive import (LOW_DTYPES, assert_grad_close, assert_values_close, fp32_floor,
                    make_indices, make_logits, make_targets, make_tokens, needs,
                    row_weight)

# Vocabulary sizes, each for a reason:
#   1      degenerate: a single column (logp = 0, entropy = 0)
#   7      tiny, not a multiple of any block or vector width
#   129    just above a power-of-two block size (128)
#   50257  GPT-2: realistic, odd, above the CPU parallel-reduction grain (32768)
VOCABS = [1, 7, 129, 50257]
# Rows per case: enough for every row kind of make_logits(kind="mixed") (4 kinds) plus
# padding on every third row; fewer rows at V=50257 to keep the file fast.
ROWS = {1: 6, 7: 8, 129: 8, 50257: 4}
# Temperatures: 1 (no scaling) and 0.7 (a common rollout value; the 1/T factor in gradients)
TEMPERATURES = [1.0, 0.7]
FINE = dict(atol=1e-9, rtol=1e-9)  # fp64 reference vs fp64 naive formulas


def _weights(shape, seed, device, dtype=torch.float32):
    """Random upstream gradients, so that every output element matters in the backward."""
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def _grad(outputs, weights, inputs):
    loss = sum((torch.where(torch.isfinite(o), o, 0.0) * w).sum()
               for o, w in zip(outputs, weights))
    return torch.autograd.grad(loss, inputs)


def _inputs(n, vocab, dtype, seed, device, center=False):
    return make_logits(n, vocab, dtype, seed=seed, center=center, device=device)


# ========================================================================== token_logprobs

def _check_token_logprobs(backend, x, tok, temperature, ignore_index=-100, grads=True,
                          spec_only=False, what=""):
    """Run token_logprobs (with entropy) on ``x`` and both references; check everything."""
    dtype = x.dtype
    xl = x.detach().clone().requires_grad_(True)
    lp, h = rlkernels.token_logprobs(xl, tok, temperature=temperature,
                                     ignore_index=ignore_index, return_entropy=True,
                                     backend=backend)
    assert lp.dtype == h.dtype == torch.float32 and lp.shape == h.shape == tok.shape
    x64 = x.detach().double().requires_grad_(True)
    lp64, h64 = rlkernels.token_logprobs(x64, tok, temperature=temperature,
                                         ignore_index=ignore_index, return_entropy=True,
                                         backend="torch")
    assert lp64.dtype == torch.float64
    xn = x.detach().double().requires_grad_(True)
    lpn = naive.token_logprobs(xn, tok, temperature, ignore_index)
    hn = naive.entropy_masked(xn, tok, temperature, ignore_index)

    assert_values_close(lp, lp64, what=f"{what} logp")
    assert_values_close(h, h64, what=f"{what} entropy")
    assert_values_close(lp64, lpn.detach(), **FINE, what=f"{what} fp64 logp vs naive")
    assert_values_close(h64, hn.detach(), **FINE, what=f"{what} fp64 entropy vs naive")

    pad = tok == ignore_index
    assert (lp[pad] == 0).all() and (h[pad] == 0).all(), "padding must give exactly 0"
    if not grads:
        return
    w = [_weights(tok.shape, 1, x.device), _weights(tok.shape, 2, x.device)]
    (g,) = _grad((lp, h), w, xl)
    (g64,) = _grad((lp64, h64), [v.double() for v in w], x64)
    (gn,) = _grad((lpn, hn), [v.double() for v in w], xn)
    floor = fp32_floor(x, temperature=temperature, upstream=row_weight(*w))
    assert_grad_close(g, g64, dtype, floor, spec_only, what=f"{what} grad")
    assert_values_close(g64, gn, **FINE, what=f"{what} fp64 grad vs naive")
    assert (g[pad] == 0).all(), "padding rows must receive an exactly-zero gradient"


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_token_logprobs_matches_references(backend, device, dtype, vocab, temperature):
    n = ROWS[vocab]
    needs(backend, "token_logprobs", device, n * vocab)
    x = _inputs(n, vocab, dtype, seed=vocab, device=device)
    tok = make_tokens(x, pad_every=3)
    _check_token_logprobs(backend, x, tok, temperature, what=f"{dtype} V={vocab}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_token_logprobs_qwen_vocab(backend, device, dtype):
    """V=151936 (Qwen2): the largest vocabulary of SPEC section 5, with few rows."""
    needs(backend, "token_logprobs", device, 3 * 151936)
    x = _inputs(3, 151936, dtype, seed=7, device=device)
    tok = make_tokens(x)
    _check_token_logprobs(backend, x, tok, 1.0, what=f"{dtype} V=151936")


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_token_logprobs_target_at_minus_inf(backend, device, dtype):
    """A token whose logit is -inf (masked vocabulary) has log-prob -inf and a finite
    gradient (onehot - p, with p = 0 there)."""
    needs(backend, "token_logprobs", device)
    x = make_logits(4, 7, dtype, kind="masked", seed=3, center=True, device=device)
    x[:, 2] = -math.inf
    x[:, 0] = 0.5  # a finite column in every row
    tok = torch.tensor([2, 0, 2, 5], device=device)
    lp = rlkernels.token_logprobs(x, tok, backend=backend)
    assert lp[0] == -math.inf and lp[2] == -math.inf
    assert torch.isfinite(lp[1])
    _check_token_logprobs(backend, x, tok, 1.0, what="target -inf")


@pytest.mark.parametrize("ignore_index", [-100, -1, 3])
def test_token_logprobs_padding(backend, device, ignore_index):
    """Padding (default -100, and custom values, even a valid id): exactly 0 outputs and an
    exactly-zero gradient, even when the padded row's logits are -inf or NaN."""
    needs(backend, "token_logprobs", device)
    x = make_logits(6, 7, torch.float32, kind="normal", seed=4, center=True, device=device)
    tok = make_tokens(x[:, :3])  # ids in [0, 3): never equal to 3
    x[1] = -math.inf          # a fully masked padding row
    x[4, 3] = float("nan")    # garbage in a padding row
    tok[1] = tok[4] = ignore_index
    xl = x.clone().requires_grad_(True)
    lp, h = rlkernels.token_logprobs(xl, tok, ignore_index=ignore_index, return_entropy=True,
                                     backend=backend)
    assert lp[1] == 0 and lp[4] == 0 and h[1] == 0 and h[4] == 0
    assert torch.isfinite(lp).all() and torch.isfinite(h).all()
    (lp.sum() + h.sum()).backward()
    assert (xl.grad[[1, 4]] == 0).all()
    assert torch.isfinite(xl.grad).all()
    keep = torch.tensor([0, 2, 3, 5], device=device)
    _check_token_logprobs(backend, x[keep], tok[keep], 1.0, ignore_index=ignore_index,
                          what="padding, valid rows")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_token_logprobs_all_padded(backend, device, dtype):
    """Every position padded: all outputs 0, all gradients 0."""
    needs(backend, "token_logprobs", device)
    x = make_logits(2 * 3, 129, dtype, seed=5, device=device).view(2, 3, 129)
    tok = torch.full((2, 3), -100, device=device)
    xl = x.clone().requires_grad_(True)
    lp, h = rlkernels.token_logprobs(xl, tok, return_entropy=True, backend=backend)
    assert lp.shape == (2, 3) and (lp == 0).all() and (h == 0).all()
    (lp.sum() + h.sum()).backward()
    assert (xl.grad == 0).all() and xl.grad.dtype == dtype


def test_token_logprobs_leading_dims(backend, device):
    """[B, T, V] logits with [B, T] tokens, int32 tokens, a single row [1, V], and 1-d [V]
    logits with a 0-d token all equal the flattened [N, V] call, bit for bit."""
    needs(backend, "token_logprobs", device)
    x = make_logits(6, 129, torch.bfloat16, seed=6, device=device)
    tok = make_tokens(x, pad_every=4)
    flat, flat_h = rlkernels.token_logprobs(x, tok, return_entropy=True, backend=backend)
    lp, h = rlkernels.token_logprobs(x.view(2, 3, 129), tok.view(2, 3).int(),
                                     return_entropy=True, backend=backend)
    assert lp.shape == h.shape == (2, 3)
    assert torch.equal(lp.reshape(-1), flat) and torch.equal(h.reshape(-1), flat_h)
    one = rlkernels.token_logprobs(x[2:3], tok[2:3], backend=backend)
    assert one.shape == (1,) and torch.equal(one, flat[2:3])
    scalar = rlkernels.token_logprobs(x[2], tok[2], backend=backend)
    assert scalar.shape == () and torch.equal(scalar, flat[2])
    _check_token_logprobs(backend, x[2].float(), tok[2], 1.3, what="1-d logits")
    _check_token_logprobs(backend, x.view(2, 3, 129).float(), tok.view(2, 3), 1.0,
                          what="[B, T, V]")


def test_token_logprobs_empty_batch(backend, device):
    """Zero rows: empty outputs, empty gradient, no error."""
    needs(backend, "token_logprobs", device)
    x = torch.zeros(0, 5, 7, device=device, requires_grad=True)
    lp = rlkernels.token_logprobs(x, torch.zeros(0, 5, dtype=torch.long, device=device),
                                  backend=backend)
    assert lp.shape == (0, 5)
    lp.sum().backward()
    assert x.grad.shape == x.shape


# ================================================================================= entropy

@pytest.mark.parametrize("vocab", [1, 7, 50257])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_entropy_matches_references(backend, device, dtype, vocab):
    n = ROWS[vocab]
    needs(backend, "token_logprobs", device, n * vocab)
    x = _inputs(n, vocab, dtype, seed=11, device=device)
    x = x.view(2, n // 2, vocab)  # leading dims [B, T]
    xl = x.clone().requires_grad_(True)
    h = rlkernels.entropy(xl, temperature=0.7, backend=backend)
    x64 = x.double().requires_grad_(True)
    h64 = rlkernels.entropy(x64, temperature=0.7, backend="torch")
    xn = x.double().requires_grad_(True)
    hn = naive.entropy(xn, 0.7)
    assert h.shape == x.shape[:-1] and h.dtype == torch.float32
    assert_values_close(h, h64, what="entropy")
    assert_values_close(h64, hn.detach(), **FINE, what="fp64 entropy vs naive")
    if vocab == 1:
        assert (h == 0).all()
    w = _weights(h.shape, 3, device)
    (g,) = _grad([h], [w], xl)
    (g64,) = _grad([h64], [w.double()], x64)
    (gn,) = _grad([hn], [w.double()], xn)
    floor = fp32_floor(x, temperature=0.7, upstream=row_weight(w))
    assert_grad_close(g, g64, dtype, floor, what="entropy grad")
    assert_values_close(g64, gn, **FINE, what="fp64 entropy grad vs naive")


def test_entropy_flat_is_log_v(backend, device):
    """Flat rows: H = log V (the maximum), exactly up to fp32 rounding."""
    needs(backend, "token_logprobs", device)
    for vocab in (7, 129, 50257):
        x = torch.full((2, vocab), 3.25, device=device)
        h = rlkernels.entropy(x, backend=backend)
        assert_values_close(h, torch.full((2,), math.log(vocab), dtype=torch.float64),
                            what=f"flat V={vocab}")


# ========================================================================= sparse_logprobs

def _check_sparse_logprobs(backend, x, idx, temperature, normalize, grads=True, what=""):
    dtype = x.dtype
    xl = x.detach().clone().requires_grad_(True)
    lp, tail = rlkernels.sparse_logprobs(xl, idx, temperature=temperature,
                                         normalize=normalize, return_tail=True,
                                         backend=backend)
    assert lp.shape == idx.shape and tail.shape == x.shape[:-1]
    assert lp.dtype == tail.dtype == torch.float32
    x64 = x.detach().double().requires_grad_(True)
    lp64, tail64 = rlkernels.sparse_logprobs(x64, idx, temperature=temperature,
                                             normalize=normalize, return_tail=True,
                                             backend="torch")
    xn = x.detach().double().requires_grad_(True)
    lpn = naive.sparse_logprobs(xn, idx, temperature, normalize)
    tailn = naive.log_tail(xn, idx, temperature)

    assert_values_close(lp, lp64, what=f"{what} logp")
    assert_values_close(tail, tail64, what=f"{what} tail")
    assert_values_close(lp64, lpn.detach(), **FINE, what=f"{what} fp64 logp vs naive")
    assert_values_close(tail64, tailn.detach(), **FINE, what=f"{what} fp64 tail vs naive")
    assert (lp[idx < 0] == -math.inf).all(), "unused slots give -inf"
    if not grads:
        return
    w = [_weights(lp.shape, 4, x.device), _weights(tail.shape, 5, x.device)]
    (g,) = _grad((lp, tail), w, xl)
    (g64,) = _grad((lp64, tail64), [v.double() for v in w], x64)
    (gn,) = _grad((lpn, tailn), [v.double() for v in w], xn)
    up = row_weight(w[0], per_row_dims=1) + row_weight(w[1])
    floor = fp32_floor(x, temperature=temperature, upstream=up)
    assert_grad_close(g, g64, dtype, floor, what=f"{what} grad")
    assert_values_close(g64, gn, **FINE, what=f"{what} fp64 grad vs naive")


@pytest.mark.parametrize("normalize", ["full", "support"])
@pytest.mark.parametrize("vocab", [7, 129, 50257])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_sparse_logprobs_matches_references(backend, device, dtype, vocab, normalize):
    n = ROWS[vocab]
    needs(backend, "sparse_logprobs", device, n * vocab)
    k = 4 if vocab == 7 else 20  # K < V; rows alternate a -1 slot (make_indices)
    x = _inputs(n, vocab, dtype, seed=20 + vocab, device=device)
    idx = make_indices(x, k)
    _check_sparse_logprobs(backend, x, idx, 0.7 if vocab == 129 else 1.0, normalize,
                           what=f"{dtype} V={vocab} {normalize}")


def test_sparse_logprobs_unused_and_duplicate_ids(backend, device):
    """-1 slots give -inf and take no part; a repeated id under "full" gives the same value in
    both slots and both slots' gradients add up; the tail counts a repeated id once."""
    needs(backend, "sparse_logprobs", device)
    x = make_logits(3, 7, torch.float32, seed=21, center=True, device=device)
    idx = torch.tensor([[0, 3, 3, -1], [-1, -1, -1, -1], [6, 5, 4, 3]], device=device)
    lp, tail = rlkernels.sparse_logprobs(x, idx, return_tail=True, backend=backend)
    assert lp[0, 1] == lp[0, 2] and lp[0, 3] == -math.inf and (lp[1] == -math.inf).all()
    assert tail[1] == 0.0  # nothing taken out of the row: log 1
    ref = naive.log1m_sum(x.double(), idx)
    assert_values_close(tail, ref, what="tail vs log1p(-sum p)")
    _check_sparse_logprobs(backend, x, idx, 1.0, "full", what="duplicates full")
    # "support" with a row of only unused slots is -inf everywhere; other rows finite
    sup = rlkernels.sparse_logprobs(x, idx, normalize="support", backend=backend)
    assert (sup[1] == -math.inf).all() and torch.isfinite(sup[2]).all()
    keep = torch.tensor([2], device=device)
    _check_sparse_logprobs(backend, x[keep], idx[keep], 1.0, "support", what="support")


def test_sparse_logprobs_tail_when_ids_cover_everything(backend, device):
    """The tail is -inf when the ids cover every column of non-zero probability: all columns,
    or all finite ones of a masked row; its gradient stays finite."""
    needs(backend, "sparse_logprobs", device)
    x = make_logits(2, 5, torch.float32, seed=22, device=device)
    x[1, 4] = -math.inf
    idx = torch.tensor([[4, 3, 2, 1, 0], [0, 1, 2, 3, -1]], device=device)
    xl = x.clone().requires_grad_(True)
    lp, tail = rlkernels.sparse_logprobs(xl, idx, return_tail=True, backend=backend)
    assert (tail == -math.inf).all()
    assert_values_close(lp.exp().sum(-1), torch.ones(2, dtype=torch.float64))
    lp.sum().backward()
    assert torch.isfinite(xl.grad).all()


def test_sparse_logprobs_tail_matches_log1m(backend, device):
    """tail = log(1 - sum over the distinct ids of p), the literal formula in fp64, on rows
    where that formula is well conditioned (the ids hold a moderate mass)."""
    needs(backend, "sparse_logprobs", device)
    x = make_logits(5, 129, torch.bfloat16, kind="normal", seed=23, device=device)
    idx = make_indices(x, 10)
    _, tail = rlkernels.sparse_logprobs(x, idx, return_tail=True, backend=backend)
    assert_values_close(tail, naive.log1m_sum(x.double(), idx), what="tail")


# ================================================================================ sparse_kl

def _check_sparse_kl(backend, x, idx, target, temperature, tail, grads=True, what=""):
    dtype = x.dtype
    xl = x.detach().clone().requires_grad_(True)
    kl = rlkernels.sparse_kl(xl, idx, target, temperature=temperature, tail=tail,
                             backend=backend)
    assert kl.shape == x.shape[:-1] and kl.dtype == torch.float32
    x64 = x.detach().double().requires_grad_(True)
    kl64 = rlkernels.sparse_kl(x64, idx, target, temperature=temperature, tail=tail,
                               backend="torch")
    xn = x.detach().double().requires_grad_(True)
    kln = naive.sparse_kl(xn, idx, target, temperature, tail)
    assert_values_close(kl, kl64, what=f"{what} kl")
    assert_values_close(kl64, kln.detach(), **FINE, what=f"{what} fp64 kl vs naive")
    if not grads:
        return
    w = _weights(kl.shape, 6, x.device)
    (g,) = _grad([kl], [w], xl)
    (g64,) = _grad([kl64], [w.double()], x64)
    (gn,) = _grad([kln], [w.double()], xn)
    floor = fp32_floor(x, temperature=temperature, upstream=row_weight(w))
    assert_grad_close(g, g64, dtype, floor, what=f"{what} grad")
    assert_values_close(g64, gn, **FINE, what=f"{what} fp64 grad vs naive")


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("vocab", [7, 129, 50257])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_sparse_kl_matches_references(backend, device, dtype, vocab, tail):
    n = ROWS[vocab]
    needs(backend, "sparse_kl", device, n * vocab)
    k = 4 if vocab == 7 else 16
    x = _inputs(n, vocab, dtype, seed=30 + vocab, device=device)
    idx = make_indices(x, k)
    target = make_targets(x, idx)  # NaN in the -1 slots: must not be read
    _check_sparse_kl(backend, x, idx, target, 0.7 if vocab == 129 else 1.0, tail,
                     what=f"{dtype} V={vocab} tail={tail}")


def test_sparse_kl_full_teacher_mass(backend, device):
    """Teacher mass exactly 1 on the ids (t_tail = 0): the tail term vanishes, with or without
    tail, even where the student's tail is -inf (ids cover every column)."""
    needs(backend, "sparse_kl", device)
    x = make_logits(2, 7, torch.float32, seed=31, center=True, device=device)
    idx = torch.tensor([[1, 4, -1], [0, 1, 2]], device=device)
    target = torch.tensor([[0.0, -math.inf, float("nan")], [-math.inf, 0.0, -math.inf]],
                          device=device)
    with_tail = rlkernels.sparse_kl(x, idx, target, tail=True, backend=backend)
    without = rlkernels.sparse_kl(x, idx, target, tail=False, backend=backend)
    assert torch.equal(with_tail, without)
    expect = -torch.log_softmax(x.double(), -1)[[0, 1], [1, 1]]
    assert_values_close(with_tail, expect, what="KL = -log s at the teacher's only id")
    _check_sparse_kl(backend, x, idx, target, 1.0, True, what="t_tail = 0")
    # ids covering all 7 columns, fp32 teacher log-probs whose exp sums to 1 - 6e-8: the
    # empty tail bucket must not turn that rounding into t_tail * (log t_tail - (-inf)) = inf
    full = torch.arange(7, device=device).expand(2, 7).contiguous()
    tgt = torch.log_softmax(torch.arange(7, dtype=torch.float64) / 9, -1).float()
    tgt = tgt.expand(2, 7).contiguous().to(device)
    assert float(tgt.exp().sum(-1)[0]) < 1.0  # the fp32 rounding this test is about
    kl = rlkernels.sparse_kl(x, full, tgt, tail=True, backend=backend)
    assert torch.isfinite(kl).all(), "ids covering all columns: no tail term, never inf"
    assert_values_close(kl, naive.sparse_kl(x.double(), full, tgt, 1.0, tail=False))


def test_sparse_kl_matches_kl_divergence_over_full_support(backend, device):
    """With K = V (the teacher's whole distribution), sparse_kl is KL(teacher || student),
    i.e. kl_divergence(kind="forward") with the teacher as the reference."""
    needs(backend, "sparse_kl", device)
    x = make_logits(4, 7, torch.float64, kind="normal", seed=32, device=device)
    y = make_logits(4, 7, torch.float64, kind="normal", seed=33, device=device)
    idx = torch.arange(7, device=device).expand(4, 7).contiguous()
    target = torch.log_softmax(y, -1)
    a = rlkernels.sparse_kl(x, idx, target, tail=False, backend=backend)
    b = rlkernels.kl_divergence(x, y, kind="forward", backend="torch")
    assert_values_close(a, b, atol=1e-12, rtol=1e-12)


def test_sparse_kl_gradient_only_for_logits(backend, device):
    """The teacher is a constant: target_logprobs gets no gradient (it is detached)."""
    needs(backend, "sparse_kl", device)
    x = make_logits(3, 7, torch.float32, seed=34, device=device).requires_grad_(True)
    idx = make_indices(x, 3, unused=False)
    target = make_targets(x, idx).requires_grad_(True)
    kl = rlkernels.sparse_kl(x, idx, target, backend=backend)
    kl.sum().backward()
    assert x.grad is not None and target.grad is None


# ============================================================================ kl_divergence

KL_CASES = [("reverse", 0.5), ("forward", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 1.0)]


def _pair(n, vocab, dtype, seed, device, center):
    """Two logits tensors with -inf columns at the same positions (a shared vocabulary mask)."""
    x = make_logits(n, vocab, torch.float64, seed=seed, center=center)
    y = make_logits(n, vocab, torch.float64, kind="normal", seed=seed + 1, center=center)
    y = torch.where(torch.isinf(x), x, y)
    return x.to(dtype).to(device), y.to(dtype).to(device)


def _check_kl(backend, x, y, kind, beta, temperature, mask=None, grads=True, what=""):
    dtype = x.dtype
    xl, yl = (t.detach().clone().requires_grad_(True) for t in (x, y))
    kl = rlkernels.kl_divergence(xl, yl, kind=kind, beta=beta, temperature=temperature,
                                 ignore_mask=mask, backend=backend)
    assert kl.shape == x.shape[:-1] and kl.dtype == torch.float32
    x64, y64 = (t.detach().double().requires_grad_(True) for t in (x, y))
    kl64 = rlkernels.kl_divergence(x64, y64, kind=kind, beta=beta, temperature=temperature,
                                   ignore_mask=mask, backend="torch")
    xn, yn = (t.detach().double().requires_grad_(True) for t in (x, y))
    kln = naive.kl_divergence(xn, yn, kind, beta, temperature, mask)
    assert_values_close(kl, kl64, what=f"{what} kl")
    assert_values_close(kl64, kln.detach(), **FINE, what=f"{what} fp64 kl vs naive")
    assert (kl >= -1e-6).all(), "a divergence is >= 0"
    if mask is not None:
        assert (kl[mask] == 0).all()
    if not grads:
        return
    w = _weights(kl.shape, 7, x.device)
    gx, gy = _grad([kl], [w], (xl, yl))
    gx64, gy64 = _grad([kl64], [w.double()], (x64, y64))
    gxn, gyn = _grad([kln], [w.double()], (xn, yn))
    floor = fp32_floor(x, y, temperature=temperature, upstream=row_weight(w))
    assert_grad_close(gx, gx64, dtype, floor, what=f"{what} grad logits")
    assert_grad_close(gy, gy64, dtype, floor, what=f"{what} grad ref_logits")
    assert_values_close(gx64, gxn, **FINE, what=f"{what} fp64 grad logits vs naive")
    assert_values_close(gy64, gyn, **FINE, what=f"{what} fp64 grad ref vs naive")
    if mask is not None:
        assert (gx[mask] == 0).all() and (gy[mask] == 0).all()


@pytest.mark.parametrize("kind,beta", KL_CASES, ids=[f"{k}-{b}" for k, b in KL_CASES])
@pytest.mark.parametrize("vocab", [7, 129, 50257])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_kl_divergence_matches_references(backend, device, dtype, vocab, kind, beta):
    n = ROWS[vocab]
    needs(backend, "kl_divergence", device, n * vocab)
    x, y = _pair(n, vocab, dtype, 40 + vocab, device, center=False)
    _check_kl(backend, x, y, kind, beta, 0.7 if vocab == 129 else 1.0,
              what=f"{dtype} V={vocab} {kind} beta={beta}")


@pytest.mark.parametrize("kind", ["reverse", "forward", "jsd"])
def test_kl_divergence_ignore_mask(backend, device, kind):
    """ignore_mask rows give 0 and an exactly-zero gradient (also with -inf / NaN logits);
    [B, T, V] inputs with a [B, T] mask."""
    needs(backend, "kl_divergence", device)
    x, y = _pair(6, 129, torch.float32, 45, device, center=True)
    mask = torch.tensor([False, True, False, False, True, False], device=device)
    _check_kl(backend, x.view(2, 3, 129), y.view(2, 3, 129), kind, 0.3, 1.0,
              mask.view(2, 3), what="ignore_mask")
    x[1] = -math.inf
    y[4, 5] = float("nan")
    xl, yl = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    kl = rlkernels.kl_divergence(xl, yl, kind=kind, ignore_mask=mask, backend=backend)
    assert (kl[mask] == 0).all() and torch.isfinite(kl).all()
    kl.sum().backward()
    assert (xl.grad[mask] == 0).all() and (yl.grad[mask] == 0).all()
    assert torch.isfinite(xl.grad).all() and torch.isfinite(yl.grad).all()


@pytest.mark.parametrize("kind,beta", KL_CASES, ids=[f"{k}-{b}" for k, b in KL_CASES])
def test_kl_divergence_identical_inputs_is_zero(backend, device, kind, beta):
    needs(backend, "kl_divergence", device)
    x = make_logits(8, 129, torch.bfloat16, seed=46, device=device)
    xl, yl = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    kl = rlkernels.kl_divergence(xl, yl, kind=kind, beta=beta, backend=backend)
    if kind != "jsd":
        assert (kl == 0).all(), "KL(p || p) is exactly 0"
    assert kl.abs().max() <= 1e-6
    kl.sum().backward()
    assert xl.grad.float().abs().max() <= 1e-6 and yl.grad.float().abs().max() <= 1e-6


def test_kl_divergence_jsd_endpoints(backend, device):
    """jsd with beta = 0 or 1 is 0 by the SPEC formula (m = q or m = p) whatever the inputs;
    beta = 0.5 is symmetric in (p, q)."""
    needs(backend, "kl_divergence", device)
    x, y = _pair(4, 129, torch.float32, 47, device, center=False)
    for beta in (0.0, 1.0):
        kl = rlkernels.kl_divergence(x, y, kind="jsd", beta=beta, backend=backend)
        assert kl.abs().max() <= 1e-6
    a = rlkernels.kl_divergence(x, y, kind="jsd", beta=0.5, backend=backend)
    b = rlkernels.kl_divergence(y, x, kind="jsd", beta=0.5, backend=backend)
    assert_values_close(a, b.double())
    rev = rlkernels.kl_divergence(x, y, kind="reverse", backend=backend)
    fwd = rlkernels.kl_divergence(y, x, kind="forward", backend=backend)
    assert_values_close(rev, fwd.double(), what="KL(p||q) both ways")


# ================================================================ fp32 precision, peaked rows

# Realistic LM logits (|lse| ~ 20-40, p_max ~ 1): the saved row statistics (max, log1p of the
# rest) keep 1 - p_y exact, so the literal SPEC bound holds in fp32 (an fp32 lse would not).
def test_fp32_grad_of_large_logits_within_spec():
    x = make_logits(16, 50257, torch.float32, kind="peaked", seed=0)
    tok = x.argmax(-1)
    tok[::2] = make_tokens(x, seed=1)[::2]
    _check_token_logprobs("torch", x, tok, 1.0, spec_only=True, what="fp32 peaked")
