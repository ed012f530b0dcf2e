"""The backend registry (SPEC section 2): available_backends, set_backend, RLKERNELS_BACKEND,
and what "auto" resolves to."""

import re

import pytest
import torch

import rlkernels
from rlkernels import backends

X = torch.randn(3, 7)
TOK = torch.tensor([0, 3, 6])
CPU = torch.device("cpu")


def test_available_backends_keys_and_values():
    status = rlkernels.available_backends()
    assert list(status) == ["torch", "triton", "cuda"]
    assert status["torch"] == "ok"
    for name, value in status.items():
        assert isinstance(value, str) and value, name
    if not torch.cuda.is_available():
        assert status["cuda"] != "ok", "the cuda backend needs a GPU"
        assert status["cuda"]  # a reason, in words


def test_available_backends_triton_reason():
    status = rlkernels.available_backends()["triton"]
    try:
        import triton  # noqa: F401
    except ImportError:
        assert status.startswith("triton is not importable"), status
    else:
        # conftest sets TRITON_INTERPRET=1 without a GPU, so an installed triton is usable
        assert status == "ok"


def test_available_backends_returns_a_copy():
    status = rlkernels.available_backends()
    status["torch"] = "broken"
    assert rlkernels.available_backends()["torch"] == "ok"


def test_default_is_auto_and_resolves_to_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("RLKERNELS_BACKEND", raising=False)
    assert backends.get_backend() == "auto"
    assert backends.resolve(None, "token_logprobs", CPU) == "torch"
    assert backends.resolve("auto", "token_logprobs", CPU) == "torch"
    for op in ("sparse_logprobs", "sparse_kl", "kl_divergence"):
        assert backends.resolve("auto", op, CPU) == "torch"


def test_set_backend_valid(monkeypatch):
    monkeypatch.delenv("RLKERNELS_BACKEND", raising=False)
    rlkernels.set_backend("torch")
    assert backends.get_backend() == "torch"
    assert backends.resolve(None, "token_logprobs", CPU) == "torch"
    out = rlkernels.token_logprobs(X, TOK)
    assert torch.equal(out, rlkernels.token_logprobs(X, TOK, backend="torch"))
    rlkernels.set_backend("auto")
    assert backends.get_backend() == "auto"
    rlkernels.set_backend(None)
    assert backends.get_backend() == "auto"


def test_explicit_backend_argument_wins_over_default():
    rlkernels.set_backend("torch")
    assert backends.resolve("auto", "token_logprobs", CPU) == "torch"
    with pytest.raises(ValueError, match=r"backend: expected one of"):
        backends.resolve("nope", "token_logprobs", CPU)


@pytest.mark.parametrize("bad", ["pytorch", "", "TORCH", 3])
def test_set_backend_invalid(bad):
    with pytest.raises(ValueError, match=rf"backend: expected one of 'torch', 'triton', 'cuda', "
                                         rf"'auto', got {re.escape(repr(bad))}"):
        rlkernels.set_backend(bad)
    assert backends.get_backend() != bad


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_set_backend_unavailable(name):
    reason = rlkernels.available_backends()[name]
    if reason == "ok":
        pytest.skip(f"{name} is available here")
    with pytest.raises(RuntimeError, match=re.escape(
            f"backend {name!r} is not available: {reason}")):
        rlkernels.set_backend(name)
    assert backends.get_backend() == "auto", "a refused backend must not become the default"


def test_env_var_valid(monkeypatch):
    monkeypatch.setenv("RLKERNELS_BACKEND", "torch")
    assert backends.get_backend() == "torch"
    assert backends.resolve(None, "kl_divergence", CPU) == "torch"
    rlkernels.kl_divergence(X, X)
    monkeypatch.setenv("RLKERNELS_BACKEND", " auto ")  # surrounding blanks are ignored
    assert backends.get_backend() == "auto"


def test_env_var_invalid(monkeypatch):
    monkeypatch.setenv("RLKERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"RLKERNELS_BACKEND: expected one of 'torch', "
                                         r"'triton', 'cuda', 'auto', got 'fastest'"):
        rlkernels.token_logprobs(X, TOK)
    # an explicit argument does not read the environment
    rlkernels.token_logprobs(X, TOK, backend="torch")


def test_env_var_empty_means_auto(monkeypatch):
    monkeypatch.setenv("RLKERNELS_BACKEND", "")
    assert backends.get_backend() == "auto"


def test_set_backend_overrides_env_var(monkeypatch):
    monkeypatch.setenv("RLKERNELS_BACKEND", "fastest")
    rlkernels.set_backend("torch")
    assert backends.get_backend() == "torch"
    rlkernels.token_logprobs(X, TOK)


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_env_var_unavailable_backend(monkeypatch, name):
    reason = rlkernels.available_backends()[name]
    if reason == "ok":
        pytest.skip(f"{name} is available here")
    monkeypatch.setenv("RLKERNELS_BACKEND", name)
    with pytest.raises(RuntimeError, match=re.escape(
            f"backend {name!r} is not available: {reason}")):
        rlkernels.token_logprobs(X, TOK)


def test_implements():
    assert backends.implements("torch", "token_logprobs")
    assert backends.implements("torch", "vocab", "token_logprobs")  # the older (family, op)
    assert not backends.implements("torch", "no_such_op")
    for name, status in rlkernels.available_backends().items():
        if status != "ok":
            assert not backends.implements(name, "token_logprobs")


def test_implements_is_truthful_about_the_parallel_form(monkeypatch):
    """The op table says which backends run an op's vocabulary-parallel form: cuda has no
    partial-forward kernel for kl_divergence, so kl_divergence with a process_group fails at
    resolution with a message that says so (not inside the custom op)."""
    monkeypatch.setattr(backends, "_status", lambda name: "ok")
    backends._RESOLVED.clear()
    assert backends.implements("cuda", "kl_divergence")
    assert not backends.implements("cuda", "kl_divergence", parallel=True)
    assert backends.implements("triton", "kl_divergence", parallel=True)
    assert backends.implements("cuda", "token_logprobs", parallel=True)
    assert backends.implements("cuda", "linear_token_logprobs", parallel=True)
    assert not backends.implements("cuda", "linear_token_stats")  # the private TRL head
    assert not backends.implements("torch", "policy_loss", parallel=True)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' has no implementation of "
                                           r"kl_divergence with a process_group"):
        backends.resolve("cuda", "kl_divergence", torch.device("cuda"), parallel=True)
    assert backends.resolve("auto", "kl_divergence", torch.device("cuda"),
                            parallel=True) == "triton"
    backends._RESOLVED.clear()


def test_backend_fixture_lists_runnable_backends(backend):
    """The conftest fixture only yields backends that run on this machine's tensors."""
    assert rlkernels.available_backends()[backend] == "ok"
    if backend == "cuda":
        assert torch.cuda.is_available()


def test_state_is_reset_between_tests_part1():
    rlkernels.set_backend("torch")
    rlkernels.set_debug(True)


def test_state_is_reset_between_tests_part2():
    """Runs after part1 (file order): the autouse fixture of conftest undid its settings."""
    from rlkernels import _checks
    assert backends._default is None and not _checks.debug_enabled()
