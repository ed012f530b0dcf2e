"""The eager fast path of the small ops: when nothing traces or transforms the call, skip the
custom-op dispatcher.

A ``torch.library.custom_op`` call with a registered autograd formula costs several times an
``autograd.Function.apply`` in host time (schema binding, redispatch below autograd, the
default filling of ``setup_context``, the dynamo-disabled backend wrapper): measured on one
CPU thread, about 6x for an 11-argument op, more than the whole policy loss of a tiny batch.
The policy and advantage ops move little data, so that host time is their cost. They
therefore run their kernels directly (through an ``autograd.Function`` with the same setup
and backward as the custom op's registration, or under ``no_grad`` for the ops without a
gradient) when :func:`eager` says the call is plain eager execution, and keep the custom op
(the contract of SPEC section 1: ``torch.compile(fullgraph=True)``, ``torch.func``, fake
tensors, export) everywhere else. Both paths call the same backend functions with the same
arguments, so they give the same bits.
"""

from __future__ import annotations

import torch

#: the tensor types the eager path takes (a subclass such as DTensor or a fake tensor takes
#: the custom op)
PLAIN = (torch.Tensor, torch.nn.Parameter)
_profiling = torch._C._autograd._profiler_enabled


def eager_mode() -> bool:
    """The part of :func:`eager` that does not look at the tensors."""
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() != 0
                or _profiling() or torch._C._are_functorch_transforms_active())


def eager(*tensors) -> bool:
    """True when the op may skip its custom op: not traced by ``torch.compile`` / export /
    compiled autograd, no ``torch.func`` transform active, no ``TorchDispatchMode`` (fake
    tensors, ``make_fx``, ``opcheck``) on the stack, no profiler recording (a profiled call
    takes the custom op, so every call shows as an ``rlkernels::<op>`` event), and every
    tensor argument a plain tensor (not a subclass such as ``DTensor`` or a fake tensor)."""
    if not eager_mode():
        return False
    for x in tensors:
        if x is not None and type(x) not in PLAIN:
            return False
    return True
