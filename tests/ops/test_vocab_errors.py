"""Bad inputs of the vocabulary ops: one test per documented error, message asserted
(SPEC section 1, "Errors": the argument, the expected and the received value)."""

import math
import re

import pytest
import torch

import rlkernels

X = torch.zeros(2, 3, 7)               # logits [B, T, V]
TOK = torch.zeros(2, 3, dtype=torch.long)
IDX = torch.zeros(2, 3, 4, dtype=torch.long)
TGT = torch.zeros(2, 3, 4)


def _all_logits_ops():
    """Every public op that reads logits, called with otherwise valid arguments."""
    return {
        "token_logprobs": lambda x: rlkernels.token_logprobs(x, TOK),
        "entropy": lambda x: rlkernels.entropy(x),
        "sparse_logprobs": lambda x: rlkernels.sparse_logprobs(x, IDX),
        "sampling_support": lambda x: rlkernels.sampling_support(x, top_k=2),
        "sparse_kl": lambda x: rlkernels.sparse_kl(x, IDX, TGT),
        "kl_divergence": lambda x: rlkernels.kl_divergence(x, x),
    }


# ------------------------------------------------------------------------------- logits

@pytest.mark.parametrize("op", list(_all_logits_ops()))
def test_logits_not_a_tensor(op):
    with pytest.raises(TypeError, match=r"logits: expected a torch.Tensor, got list"):
        _all_logits_ops()[op]([[0.0, 1.0]])


@pytest.mark.parametrize("op", list(_all_logits_ops()))
def test_logits_integer_dtype(op):
    with pytest.raises(TypeError, match=r"logits: expected dtype in \(bfloat16, float16, "
                                        r"float32, float64\), got int64"):
        _all_logits_ops()[op](torch.zeros(2, 3, 7, dtype=torch.long))


@pytest.mark.parametrize("op", list(_all_logits_ops()))
def test_logits_empty_vocabulary(op):
    with pytest.raises(ValueError, match=re.escape(
            "logits: expected a vocabulary size V >= 1 in the last dimension, "
            "got shape (2, 3, 0)")):
        _all_logits_ops()[op](torch.zeros(2, 3, 0))


@pytest.mark.parametrize("op", list(_all_logits_ops()))
def test_logits_zero_dim(op):
    with pytest.raises(ValueError, match=r"logits: expected at least 1 dimension\(s\), got "
                                         r"shape \(\)"):
        _all_logits_ops()[op](torch.tensor(1.0))


def test_ref_logits_checked_like_logits():
    with pytest.raises(TypeError, match=r"ref_logits: expected a torch.Tensor, got float"):
        rlkernels.kl_divergence(X, 1.0)
    with pytest.raises(ValueError, match=r"ref_logits: expected a vocabulary size V >= 1"):
        rlkernels.kl_divergence(X, torch.zeros(2, 3, 0))


# -------------------------------------------------------------------------------- tokens

def test_tokens_shape_mismatch():
    with pytest.raises(ValueError, match=re.escape(
            "tokens: expected shape (2, 3) (the leading dims of logits), got (2, 4)")):
        rlkernels.token_logprobs(X, torch.zeros(2, 4, dtype=torch.long))


def test_tokens_float_dtype():
    with pytest.raises(TypeError, match=r"tokens: expected dtype in \(int32, int64\), "
                                        r"got float32"):
        rlkernels.token_logprobs(X, torch.zeros(2, 3))


def test_tokens_not_a_tensor():
    with pytest.raises(TypeError, match=r"tokens: expected a torch.Tensor, got list"):
        rlkernels.token_logprobs(X, [[0, 1, 2], [0, 1, 2]])


def test_tokens_device_mismatch():
    # a meta tensor stands in for "another device": the check runs before any kernel
    with pytest.raises(ValueError, match=r"tokens: expected a tensor on cpu \(the device of "
                                         r"logits\), got one on meta"):
        rlkernels.token_logprobs(X, TOK.to("meta"))


@pytest.mark.gpu
def test_tokens_on_another_gpu_device():
    with pytest.raises(ValueError, match=r"tokens: expected a tensor on cuda"):
        rlkernels.token_logprobs(X.cuda(), TOK)


def test_ignore_index_not_an_int():
    with pytest.raises(TypeError, match=r"ignore_index: expected an int, got float"):
        rlkernels.token_logprobs(X, TOK, ignore_index=-100.0)


def test_return_entropy_not_a_bool():
    with pytest.raises(TypeError, match=r"return_entropy: expected a bool, got int"):
        rlkernels.token_logprobs(X, TOK, return_entropy=1)


# ---------------------------------------------------------------------------- temperature

def _temperature_ops():
    return {
        "token_logprobs": lambda t: rlkernels.token_logprobs(X, TOK, temperature=t),
        "entropy": lambda t: rlkernels.entropy(X, temperature=t),
        "sparse_logprobs": lambda t: rlkernels.sparse_logprobs(X, IDX, temperature=t),
        "sampling_support": lambda t: rlkernels.sampling_support(X, top_k=2, temperature=t),
        "sparse_kl": lambda t: rlkernels.sparse_kl(X, IDX, TGT, temperature=t),
        "kl_divergence": lambda t: rlkernels.kl_divergence(X, X, temperature=t),
    }


@pytest.mark.parametrize("op", list(_temperature_ops()))
@pytest.mark.parametrize("bad,shown", [(0.0, "0.0"), (-1.0, "-1.0"), (math.nan, "nan"),
                                       (math.inf, "inf")])
def test_temperature_out_of_range(op, bad, shown):
    with pytest.raises(ValueError, match=rf"temperature: expected a finite number > 0, "
                                         rf"got {shown}"):
        _temperature_ops()[op](bad)


@pytest.mark.parametrize("op", list(_temperature_ops()))
@pytest.mark.parametrize("bad,shown", [(True, "bool"), ("1.0", "str"), (None, "NoneType")])
def test_temperature_wrong_type(op, bad, shown):
    with pytest.raises(TypeError, match=rf"temperature: expected a float, got {shown}"):
        _temperature_ops()[op](bad)


# ------------------------------------------------------------------------ option strings

def test_unknown_normalize():
    with pytest.raises(ValueError, match=r"normalize: expected one of 'full', 'support', "
                                         r"got 'topk'"):
        rlkernels.sparse_logprobs(X, IDX, normalize="topk")


def test_unknown_kind():
    with pytest.raises(ValueError, match=r"kind: expected one of 'reverse', 'forward', 'jsd', "
                                         r"'alpha', 'tv', got 'kl'"):
        rlkernels.kl_divergence(X, X, kind="kl")


@pytest.mark.parametrize("beta,err,msg", [
    (-0.1, ValueError, r"beta: expected a number >= 0.0, got -0.1"),
    (1.5, ValueError, r"beta: expected a number <= 1.0, got 1.5"),
    (math.nan, ValueError, r"beta: expected a finite number, got nan"),
    (True, TypeError, r"beta: expected a float, got bool"),
])
def test_beta_out_of_range(beta, err, msg):
    with pytest.raises(err, match=msg):
        rlkernels.kl_divergence(X, X, kind="jsd", beta=beta)


def test_return_tail_and_tail_not_bools():
    with pytest.raises(TypeError, match=r"return_tail: expected a bool, got str"):
        rlkernels.sparse_logprobs(X, IDX, return_tail="yes")
    with pytest.raises(TypeError, match=r"tail: expected a bool, got int"):
        rlkernels.sparse_kl(X, IDX, TGT, tail=0)


# ------------------------------------------------------------------------------- indices

@pytest.mark.parametrize("op", ["sparse_logprobs", "sparse_kl"])
def test_indices_rank_mismatch(op):
    idx = torch.zeros(6, 4, dtype=torch.long)  # flattened rows instead of [2, 3, K]
    with pytest.raises(ValueError, match=re.escape(
            "indices: expected shape (*(2, 3), K) (the leading dims of logits plus K ids), "
            "got (6, 4)")):
        if op == "sparse_logprobs":
            rlkernels.sparse_logprobs(X, idx)
        else:
            rlkernels.sparse_kl(X, idx, torch.zeros(6, 4))


def test_indices_leading_dims_mismatch():
    with pytest.raises(ValueError, match=re.escape(
            "indices: expected shape (2, 3, 4) (the leading dims of logits plus K ids), "
            "got (3, 2, 4)")):
        rlkernels.sparse_logprobs(X, torch.zeros(3, 2, 4, dtype=torch.long))


def test_indices_float_dtype():
    with pytest.raises(TypeError, match=r"indices: expected dtype in \(int32, int64\), "
                                        r"got float32"):
        rlkernels.sparse_logprobs(X, IDX.float())


def test_indices_device_mismatch():
    with pytest.raises(ValueError, match=r"indices: expected a tensor on cpu \(the device of "
                                         r"logits\), got one on meta"):
        rlkernels.sparse_logprobs(X, IDX.to("meta"))


# ----------------------------------------------------------------------- target_logprobs

def test_target_logprobs_shape_mismatch():
    with pytest.raises(ValueError, match=re.escape(
            "target_logprobs: expected shape (2, 3, 4) (the shape of indices), got (2, 3, 5)")):
        rlkernels.sparse_kl(X, IDX, torch.zeros(2, 3, 5))


def test_target_logprobs_integer_dtype():
    with pytest.raises(TypeError, match=r"target_logprobs: expected dtype in \(bfloat16, "
                                        r"float16, float32, float64\), got int64"):
        rlkernels.sparse_kl(X, IDX, IDX)


def test_target_logprobs_device_mismatch():
    with pytest.raises(ValueError, match=r"target_logprobs: expected a tensor on cpu"):
        rlkernels.sparse_kl(X, IDX, TGT.to("meta"))


# --------------------------------------------------------------------------- kl_divergence

def test_ref_logits_shape_mismatch():
    with pytest.raises(ValueError, match=re.escape(
            "ref_logits: expected shape (2, 3, 7) (the shape of logits), got (2, 3, 8)")):
        rlkernels.kl_divergence(X, torch.zeros(2, 3, 8))


def test_ref_logits_dtype_mismatch():
    with pytest.raises(TypeError, match=r"ref_logits: expected dtype float32 \(the dtype of "
                                        r"logits\), got bfloat16"):
        rlkernels.kl_divergence(X, X.bfloat16())


def test_ref_logits_device_mismatch():
    with pytest.raises(ValueError, match=r"ref_logits: expected a tensor on cpu"):
        rlkernels.kl_divergence(X, X.to("meta"))


def test_ignore_mask_not_bool():
    with pytest.raises(TypeError, match=r"ignore_mask: expected dtype in \(bool\), "
                                        r"got float32"):
        rlkernels.kl_divergence(X, X, ignore_mask=torch.zeros(2, 3))


def test_ignore_mask_shape_mismatch():
    with pytest.raises(ValueError, match=re.escape(
            "ignore_mask: expected shape (2, 3) (the leading dims of logits), got (6,)")):
        rlkernels.kl_divergence(X, X, ignore_mask=torch.zeros(6, dtype=torch.bool))


# ---------------------------------------------------------------------- sampling_support

def test_sampling_support_needs_top_k_or_top_p():
    with pytest.raises(ValueError, match=r"top_k, top_p: expected at least one of them to be "
                                         r"set, got neither"):
        rlkernels.sampling_support(X)


@pytest.mark.parametrize("top_k,err,msg", [
    (0, ValueError, r"top_k: expected an int >= 1, got 0"),
    (-3, ValueError, r"top_k: expected an int >= 1, got -3"),
    (2.0, TypeError, r"top_k: expected an int, got float"),
    (True, TypeError, r"top_k: expected an int, got bool"),
])
def test_sampling_support_bad_top_k(top_k, err, msg):
    with pytest.raises(err, match=msg):
        rlkernels.sampling_support(X, top_k=top_k)


@pytest.mark.parametrize("top_p,err,msg", [
    (0.0, ValueError, r"top_p: expected a number > 0.0, got 0.0"),
    (-0.5, ValueError, r"top_p: expected a number > 0.0, got -0.5"),
    (1.01, ValueError, r"top_p: expected a number <= 1.0, got 1.01"),
    (math.nan, ValueError, r"top_p: expected a finite number, got nan"),
    ("0.9", TypeError, r"top_p: expected a float, got str"),
])
def test_sampling_support_bad_top_p(top_p, err, msg):
    with pytest.raises(err, match=msg):
        rlkernels.sampling_support(X, top_p=top_p)


# ------------------------------------------------------------------ process_group, backend

@pytest.mark.parametrize("op", ["token_logprobs", "entropy", "kl_divergence", "grpo_loss"])
def test_process_group_type(op):
    pol = (torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3, dtype=torch.bool))
    call = {
        "token_logprobs": lambda: rlkernels.token_logprobs(X, TOK, process_group=object()),
        "entropy": lambda: rlkernels.entropy(X, process_group=object()),
        "kl_divergence": lambda: rlkernels.kl_divergence(X, X, process_group=object()),
        "grpo_loss": lambda: rlkernels.grpo_loss(X, TOK, *pol, process_group=object()),
    }[op]
    with pytest.raises(TypeError, match=r"process_group: expected a torch.distributed "
                                        r"ProcessGroup \(or None\), got object"):
        call()


@pytest.mark.parametrize("op", ["token_logprobs", "entropy", "sparse_logprobs", "sparse_kl",
                                "kl_divergence"])
@pytest.mark.parametrize("bad", ["pytorch", "", "Torch", 1])
def test_unknown_backend(op, bad):
    call = {
        "token_logprobs": lambda b: rlkernels.token_logprobs(X, TOK, backend=b),
        "entropy": lambda b: rlkernels.entropy(X, backend=b),
        "sparse_logprobs": lambda b: rlkernels.sparse_logprobs(X, IDX, backend=b),
        "sparse_kl": lambda b: rlkernels.sparse_kl(X, IDX, TGT, backend=b),
        "kl_divergence": lambda b: rlkernels.kl_divergence(X, X, backend=b),
    }[op]
    with pytest.raises(ValueError, match=rf"backend: expected one of 'torch', 'triton', "
                                         rf"'cuda', 'auto', got {re.escape(repr(bad))}"):
        call(bad)


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_unavailable_backend_explicitly(name):
    reason = rlkernels.available_backends()[name]
    if reason == "ok":
        pytest.skip(f"{name} is available here")
    with pytest.raises(RuntimeError, match=re.escape(
            f"backend {name!r} is not available: {reason}")):
        rlkernels.token_logprobs(X, TOK, backend=name)


def test_cuda_backend_with_cpu_tensors():
    if rlkernels.available_backends()["cuda"] != "ok":
        pytest.skip("cuda backend not available: covered by test_unavailable_backend_explicitly")
    from rlkernels import backends
    if not backends.implements("cuda", "vocab", "token_logprobs"):
        pytest.skip("cuda backend has no token_logprobs yet")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' needs CUDA tensors"):
        rlkernels.token_logprobs(X, TOK, backend="cuda")


# ----------------------------------------------------------------------------- debug mode

def test_debug_token_out_of_range():
    bad = TOK.clone()
    bad[1, 2] = 7
    rlkernels.token_logprobs(X, TOK)  # in range: fine
    rlkernels.set_debug(True)
    with pytest.raises(ValueError, match=re.escape(
            "tokens: expected ids in [0, 7) or -100, got 7 (1 id(s) out of range)")):
        rlkernels.token_logprobs(X, bad)
    bad[0, 0] = -5
    with pytest.raises(ValueError, match=re.escape(
            "tokens: expected ids in [0, 7) or -100, got -5 (2 id(s) out of range)")):
        rlkernels.token_logprobs(X, bad)
    ok = TOK.clone()
    ok[0, 1] = -100
    rlkernels.token_logprobs(X, ok)  # padding is in range
    ok[0, 1] = -1
    rlkernels.token_logprobs(X, ok, ignore_index=-1)


@pytest.mark.parametrize("op", ["sparse_logprobs", "sparse_kl"])
@pytest.mark.parametrize("bad_id", [7, -2])
def test_debug_index_out_of_range(op, bad_id):
    bad = IDX.clone()
    bad[0, 1, 3] = bad_id
    bad[1, 0, 0] = -1  # an unused slot is in range
    call = (lambda i: rlkernels.sparse_logprobs(X, i)) if op == "sparse_logprobs" else \
        (lambda i: rlkernels.sparse_kl(X, i, TGT))
    rlkernels.set_debug(True)
    with pytest.raises(ValueError, match=re.escape(
            f"indices: expected ids in [0, 7) or -1 for an unused slot, got {bad_id}")):
        call(bad)
    bad[0, 1, 3] = 6
    call(bad)


def _token_ops():
    """Every public op that takes vocabulary ids, with otherwise valid arguments; ``tok`` is
    ``[2, 3]`` (the sparse ops get a ``[2, 3, 4]`` support whose first id is ``tok``)."""
    hidden, weight = torch.zeros(2, 3, 5), torch.zeros(7, 5)
    old, adv, mask = torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3, dtype=torch.bool)

    def support(tok):
        idx = IDX.clone()
        idx[..., 0] = tok
        return idx
    return {
        "token_logprobs": lambda tok: rlkernels.token_logprobs(X, tok),
        "grpo_loss": lambda tok: rlkernels.grpo_loss(X, tok, old, adv, mask),
        "linear_token_logprobs": lambda tok: rlkernels.linear_token_logprobs(hidden, weight,
                                                                             tok),
        "linear_grpo_loss": lambda tok: rlkernels.linear_grpo_loss(hidden, weight, tok, old,
                                                                   adv, mask),
        "sparse_logprobs": lambda tok: rlkernels.sparse_logprobs(X, support(tok)),
        "sparse_kl": lambda tok: rlkernels.sparse_kl(X, support(tok), TGT),
    }


@pytest.mark.parametrize("op", list(_token_ops()))
@pytest.mark.parametrize("bad_id", [7, -2])
def test_cpu_ids_out_of_range_raise_without_debug_mode(op, bad_id, backend):
    """On CPU tensors the range check reads no device memory, so it runs outside debug mode
    too: the SPEC error, not torch's ``index 7 is out of bounds`` or a wrong answer."""
    if backend == "cuda":
        pytest.skip("the cuda backend takes CUDA tensors")
    from rlkernels import _checks
    assert not _checks.debug_enabled()
    rlkernels.set_backend(backend)
    bad = TOK.clone()
    bad[1, 2] = bad_id
    if op.startswith("sparse"):
        msg = f"indices: expected ids in [0, 7) or -1 for an unused slot, got {bad_id}"
    else:
        msg = f"tokens: expected ids in [0, 7) or -100, got {bad_id} (1 id(s) out of range)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        _token_ops()[op](bad)
    good = TOK.clone()
    good[0, 0] = -1 if op.startswith("sparse") else -100
    _token_ops()[op](good)


def test_range_checks_read_no_device_data_outside_debug_mode():
    """Outside debug mode only plain CPU tensors are read (no host sync on a GPU); debug mode
    reads every tensor. A meta tensor stands in for a CUDA one here."""
    from rlkernels import _checks
    cpu, meta = torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long, device="meta")
    assert _checks.data_checks(cpu) and not _checks.data_checks(meta)
    seen = []
    torch.func.vmap(lambda t: seen.append(_checks.data_checks(t)) or t)(
        torch.zeros(2, 3, dtype=torch.long))
    assert seen == [False]
    rlkernels.set_debug(True)
    assert _checks.data_checks(meta)


def test_cpu_range_check_under_compile_and_vmap():
    """The CPU check steps aside where the data cannot be read eagerly: torch.compile
    (fullgraph, no graph break) and torch.func.vmap still run."""
    tok = TOK.clone()
    tok[0, 1] = 5
    eager = rlkernels.token_logprobs(X, tok, backend="torch")
    compiled = torch.compile(lambda x, t: rlkernels.token_logprobs(x, t, backend="torch"),
                             fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(X, tok), eager)
    mapped = torch.func.vmap(lambda x, t: rlkernels.token_logprobs(x, t, backend="torch"))
    torch.testing.assert_close(mapped(X, tok), eager)
