"""The op table (rlkernels/ops/_table.py) against the backend modules and the custom ops it
generates: every declared kernel exists, no backend kernel is left undeclared, every op and
its backward are registered under their names, and a declaration that names something that
does not exist fails when it is made."""

import importlib

import pytest
import torch

import rlkernels  # noqa: F401  (fills the table)
from rlkernels import backends
from rlkernels.ops._table import OPS, Backward, Op

_PUBLIC_OPS = {"token_logprobs", "sparse_logprobs", "sparse_kl", "kl_divergence", "kl_penalty",
               "policy_loss", "grpo_loss", "linear_token_logprobs", "linear_grpo_loss",
               "linear_sparse_logprobs",
               "group_advantages", "masked_whiten", "gae", "discounted_returns",
               "rollout_correction"}


def _module(backend: str, family: str):
    try:
        return importlib.import_module(f"{backends._PACKAGES[backend]}.{family}")
    except ImportError:  # triton not installed: nothing to check for it here
        pytest.skip(f"{backends._PACKAGES[backend]}.{family} does not import here")


def test_every_public_op_is_declared():
    assert _PUBLIC_OPS <= set(OPS)
    # the private TRL head; discounted_returns(baseline=, whiten=) (ReMax / REINFORCE++)
    assert set(OPS) - _PUBLIC_OPS == {"linear_token_stats", "discounted_advantages"}


@pytest.mark.parametrize("name", sorted(OPS))
def test_declared_kernels_exist(name):
    op = OPS[name]
    for backend in op.backends:
        mod = _module(backend, op.kernel_family)
        assert hasattr(mod, f"{name}_forward"), f"{backend}: {op.kernel_family}.{name}_forward"
        if op.backward is not None:
            assert hasattr(mod, f"{name}_backward"), f"{backend}: {name}_backward"
    if op.parallel is not None and name == "kl_divergence":
        for backend in op.parallel.backends:
            assert hasattr(_module(backend, "vocab"), "kl_divergence_partial_forward")


@pytest.mark.parametrize("backend", backends.BACKENDS)
@pytest.mark.parametrize("family", ["vocab", "sparse", "policy", "linear", "advantage",
                                    "rollout"])
def test_no_backend_kernel_is_undeclared(backend, family):
    """A ``<op>_forward`` in a backend module that the table does not declare for that
    backend would be dead code (as the cuda kl_penalty kernel was)."""
    try:
        mod = importlib.import_module(f"{backends._PACKAGES[backend]}.{family}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{backends._PACKAGES[backend]}.{family}":
            return  # the backend has no kernels for this family
        pytest.skip(str(exc))
    except ImportError as exc:
        pytest.skip(str(exc))
    for attr in dir(mod):
        fn = getattr(mod, attr)
        if attr.startswith("_") or not attr.endswith("_forward") \
                or attr.endswith("_partial_forward") or not callable(fn) \
                or getattr(fn, "__module__", None) != mod.__name__:  # imported, not defined
            continue
        op = attr[:-len("_forward")]
        assert op in OPS and backend in OPS[op].backends, \
            f"{backend}.{family}.{attr} is not declared in the op table"
        assert OPS[op].kernel_family == family


@pytest.mark.parametrize("name", sorted(OPS))
def test_custom_ops_are_registered_by_name(name):
    op = OPS[name]
    assert hasattr(torch.ops.rlkernels, name)
    if op.backward is not None:
        assert hasattr(torch.ops.rlkernels, f"{name}_backward")
    if op.inplace is not None:
        assert hasattr(torch.ops.rlkernels, f"{name}_backward_")
    if op.parallel is not None:
        assert hasattr(torch.ops.rlkernels, f"{name}_vp")


def _declare(**kwargs):
    base = dict(signature="_test_table_op(Tensor x, str backend) -> (y)", family="vocab",
                fake=lambda a: a.x)
    base.update(kwargs)
    return Op(**base)


@pytest.mark.parametrize("kwargs, message", [
    (dict(saved=("z",)), "unknown name 'z'"),
    (dict(differentiable=("w",)), "differentiable 'w' is not an input"),
    (dict(differentiable=("x",), backward=Backward(("grad_y", "x"), grads=("x",))),
     "backward needs tensor 'x' but it is not saved"),
    (dict(differentiable=("x",), saved=("x",),
          backward=Backward(("grad_q", "x"), grads=("x",))),
     "backward argument 'grad_q'"),
    (dict(signature="_test_table_op(Tensor x, tensor y, str backend) -> (y)"),
     "unknown type 'tensor'"),
    (dict(signature="_test_table_op(Tensor x, str backend)"), "expected 'name\\(<inputs>\\)"),
    (dict(signature="_test_table_op(Tensor x, str backend) -> (y, z)", eager_outputs=3),
     "eager_outputs must be in \\[1, 2\\], got 3"),
    (dict(signature="_test_table_op(Tensor x, str backend) -> (y, z)", eager_outputs=1),
     "output 'z' beyond eager_outputs must be nondiff"),
    (dict(signature="_test_table_op(Tensor x, str backend) -> (y, z)", eager_outputs=1,
          nondiff=("z",), differentiable=("x",), saved=("x",),
          backward=Backward(("grad_y", "grad_z", "x"), grads=("x",))),
     "output 'z' beyond eager_outputs must be nondiff, without grad_if, and its gradient "
     "unread"),
])
def test_bad_declarations_fail_when_made(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _declare(**kwargs)
    assert "_test_table_op" not in OPS


def test_declared_twice():
    with pytest.raises(ValueError, match="declared twice"):
        _declare(signature="token_logprobs(Tensor x, str backend) -> (y)")


def test_every_op_has_a_verify_case_and_contract_cases():
    """A new op declared in the table but missing from ``rlkernels verify`` or from the
    contract suite fails here, not silently."""
    import sys

    from rlkernels import _verify
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent / "contract"))
    try:
        from _cases import CASES
    finally:
        sys.path.pop(0)
    verified = {op for ops in _verify._DISPATCH.values() for op in ops}
    contract = {c.op for c in CASES}
    for name in OPS:
        if name == "linear_token_stats":
            continue  # private (the TRL head): tests/integrations/test_trl.py
        assert name in verified, f"{name}: no case in rlkernels/_verify.py"
        assert name in contract, f"{name}: no case in tests/contract/_cases.py"
