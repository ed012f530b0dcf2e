"""The op table: every op is declared once, by name; its plumbing is generated from that.

An :class:`Op` names its inputs (a schema string, in the order of the custom op), its
outputs, which inputs are differentiable, what backward needs saved, the backend kernel
functions (``<name>_forward`` / ``<name>_backward``, looked up on ``rlkernels.<backend>.
<family>``) and the backends that have them. From that declaration this module builds:

* the ``torch.library.custom_op`` ``rlkernels::<name>`` and its fake (shape function);
* the backward custom op ``rlkernels::<name>_backward`` (and ``<name>_backward_``, which
  writes the gradient into an input's storage, when the op declares ``inplace``), and the
  ``setup_context`` / backward formula that connect them. Everything is matched **by name**:
  the upstream gradient of output ``x`` is ``grad_x``, ``need_x`` says whether input ``x``
  needs a gradient, the backward kernel's results are the gradients of the inputs listed in
  ``Backward.grads``; nothing is indexed by position;
* the vocabulary-parallel form ``rlkernels::<name>_vp`` (SPEC 3.5) when the op declares a
  :class:`Parallel`: the same inputs plus ``int group``, a forward that combines the shards'
  statistics with collectives, and the same backward kernels (fed with shard-local saved
  tensors), followed by an optional reduction;
* the gradient-in-forward form (``grad_in_forward=`` a :class:`GradInForward`):
  ``rlkernels::<name>_gif`` (the outputs plus the gradient of one scalar output w.r.t. one
  input for an upstream gradient of 1, formed in the forward), ``<name>_gif_`` (the same
  gradient written into that input's storage), ``<name>_gif_attach`` (connects the
  scalar to the input for autograd; its backward only scales the saved gradient) and
  ``<name>_gif_scale_`` (that scaling, in place);
* the eager fast path (``eager=True``, the default): an ``autograd.Function`` with the same
  forward, setup and backward, used when nothing traces, transforms or profiles the call
  (see ``ops/_eager.py``): a plain eager call skips the custom-op dispatcher's host time;
* the registry :data:`OPS` that ``backends.implements``, ``rlkernels verify`` and the
  benchmarks read, instead of keeping their own op lists.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from .. import backends
from ._eager import PLAIN, eager, eager_mode

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_unwrap_dead = torch._C._functorch.unwrap_if_dead

Tensor = torch.Tensor

#: every declared op by name, in declaration order
OPS: Dict[str, "Op"] = {}

_NO_DEFAULT = object()
_NOT_PLAIN = object()  # _eager_call: a tensor input is not a plain tensor


@dataclass(frozen=True)
class _Arg:
    name: str
    type: str
    default: object = _NO_DEFAULT

    @property
    def is_tensor(self) -> bool:
        return self.type in ("Tensor", "Tensor?")

    def schema(self, mutable: bool = False) -> str:
        typ = "Tensor(a!)" if mutable else self.type
        if self.default is _NO_DEFAULT:
            return f"{typ} {self.name}"
        value = self.default
        text = "None" if value is None else (f'"{value}"' if isinstance(value, str)
                                              else repr(value))
        return f"{typ} {self.name}={text}"


_TYPES = ("Tensor", "Tensor?", "float", "float?", "int", "bool", "str", "str?", "float[]")


def _parse(signature: str) -> Tuple[_Arg, ...]:
    """``"Tensor logits, Tensor? tokens, float temperature, str path='auto'"`` -> args."""
    args = []
    for part in signature.split(","):
        part = part.strip()
        if not part:
            continue
        decl, eq, default = part.partition("=")
        typ, name = decl.split()
        if typ not in _TYPES:
            raise TypeError(f"op table: unknown type {typ!r} of argument {name!r}")
        value = ast.literal_eval(default.strip()) if eq else _NO_DEFAULT
        args.append(_Arg(name, typ, value))
    return tuple(args)


class Args:
    """An op's arguments (and derived values) by name: ``a["logits"]`` or ``a.logits``. Not a
    dict, so that no input name (``values``, ``items``, ...) is shadowed by a method."""

    __slots__ = ("_d",)

    def __init__(self, *source):
        self._d = dict(*source)

    def __getattr__(self, name):
        try:
            return self._d[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name):
        return self._d[name]

    def __setitem__(self, name, value):
        self._d[name] = value

    def __contains__(self, name) -> bool:
        return name in self._d

    @classmethod
    def of(cls, d: dict) -> "Args":
        """A view of the dict ``d`` (no copy): what the declarations' callbacks receive."""
        a = cls.__new__(cls)
        a._d = d
        return a


@dataclass(frozen=True)
class Backward:
    """The backward kernel of an op: ``args`` are the names it takes, in its order (inputs,
    saved outputs, ``grad_<output>``, ``need_<input>``, derived values, and ``inplace``: a
    flag that is True in the in-place backward op); it returns the gradients of ``grads``
    (input names), ``None`` for one that was not asked for."""

    args: Tuple[str, ...]
    grads: Tuple[str, ...]


@dataclass(frozen=True)
class Parallel:
    """The vocabulary-parallel form of an op (SPEC 3.5).

    ``forward(a, kernel)`` computes the op's outputs plus ``extra_outputs`` with collectives
    on ``_dist.group_of(a.group)``; ``kernel(fn, family=None)`` is the resolved backend's
    kernel function. ``save_as`` replaces a saved input by an extra output (the shard-local
    token ids) unless that input is None. ``reduce(a, grads)``, when given, runs after the
    backward kernel inside its own custom op ``<name>_vp_backward`` (a collective on the
    gradients); ``a`` then also holds ``group`` and every ``need_<input>``. ``backends``:
    the backends whose kernels the parallel forward can run on."""

    forward: Callable
    backends: Tuple[str, ...]
    extra_outputs: Tuple[str, ...] = ()
    extra_fake: Optional[Callable] = None
    save_as: Dict[str, str] = field(default_factory=dict)
    reduce: Optional[Callable] = None


@dataclass(frozen=True)
class GradInForward:
    """The gradient-in-forward form of an op: the forward also forms ``d <loss> / d <wrt>``
    for an upstream gradient of 1, and backward only multiplies it by the upstream scalar
    (reads none of the inputs), which is exact for any upstream scalar since ``loss`` is a
    scalar output. Only ``loss`` is differentiable in this form (every other output must be
    declared ``nondiff``).

    ``forward(a, kernel, out)`` returns the op's outputs plus that gradient; ``out`` is None
    (a new buffer) or the ``wrt`` input itself when the op's ``inplace`` flag is set (the
    gradient overwrites it). ``kernel(fn, family=None)`` is the resolved backend's kernel.
    ``family``: the backend modules that hold ``<name>_gif_scale_(grad, g)`` (``grad *= g``
    in place, in the compute dtype, nothing where ``g == 1``) for each of the op's
    backends. The gradient buffer lives from forward to backward, and backward consumes it
    (scales it in place and hands it to autograd): such a graph is backpropagated once.
    ``parallel(a, kernel, out)``, for an op with a :class:`Parallel` form: the same in the
    vocabulary-parallel form (``a`` also holds ``group``), returning the outputs, the
    parallel form's extra outputs, then the gradient of this rank's shard of ``wrt``
    (generates ``<name>_gif_vp`` and ``<name>_gif_vp_``).

    ``wrt`` may name several inputs (a tuple, e.g. ``("hidden", "weight", "bias")``): the
    forward then returns one gradient per name, in that order, and ``a`` also holds
    ``need_<wrt>`` (whether that input requires a gradient): a gradient that is not needed,
    or whose input is None, is returned as an empty tensor (custom ops return no None) and
    the forward should skip its work. Not with ``inplace`` (one storage to overwrite)."""

    forward: Callable
    family: str
    loss: str
    wrt: Union[str, Tuple[str, ...]]
    parallel: Optional[Callable] = None

    @property
    def wrts(self) -> Tuple[str, ...]:
        """``wrt`` as a tuple (one name or several)."""
        return (self.wrt,) if isinstance(self.wrt, str) else tuple(self.wrt)


@dataclass(eq=False)
class Op:
    """One op, declared once. See the module docstring for what is generated from it.

    ``signature``: ``"name(<inputs>) -> (<outputs>)"``: the custom op's schema arguments
    in order (``str backend`` included; types ``Tensor``, ``Tensor?``, ``float``, ``float?``,
    ``int``, ``bool``, ``str``, ``str?``, ``float[]``, defaults allowed) and the output
    names. ``fake(a)``: the outputs' empty tensors.
    ``derive``: values computed from inputs for the kernels, ``{name: (sources, fn)}``.
    ``kernel_args``: the forward kernel's arguments (default: every input but ``backend``).
    ``grad_if``: ``{output: predicate(a)}``; the output's upstream gradient is passed to the
    backward kernel as None where the predicate is False (an output the call did not ask
    for); an input's name instead of a predicate means "that input is neither None nor
    False" (no call per op call). ``contiguous_grads``: upstream gradients reach the
    backward kernel contiguous.
    ``inplace``: ``(flag input, target input)``: when the flag is True the backward
    writes the gradient of the target into the target's storage.
    ``grad_in_forward``: a :class:`GradInForward`, the form that forms the gradient in the
    forward (called with ``op(..., grad_in_forward=True)``).
    ``eager``: plain eager calls skip the custom op (``ops/_eager.py``); ``False`` keeps
    every call on the custom op.
    ``eager_outputs``: the eager ``autograd.Function`` returns only the first n outputs (the
    rest, non-differentiable and read by the backward only, are saved as the forward's
    intermediates: each output of a Function costs autograd ~4 k instructions per call); the
    op's caller reads only the first n outputs of any path.
    """

    signature: str
    family: str
    fake: Callable
    backends: Tuple[str, ...] = ("torch", "triton", "cuda")
    kernel_family: Optional[str] = None
    derive: Dict[str, Tuple[Tuple[str, ...], Callable]] = field(default_factory=dict)
    kernel_args: Optional[Tuple[str, ...]] = None
    differentiable: Tuple[str, ...] = ()
    nondiff: Tuple[str, ...] = ()
    saved: Tuple[str, ...] = ()
    backward: Optional[Backward] = None
    grad_if: Dict[str, Callable] = field(default_factory=dict)
    eager: bool = True
    inplace: Optional[Tuple[str, str]] = None
    parallel: Optional[Parallel] = None
    contiguous_grads: bool = False
    grad_in_forward: Optional[GradInForward] = None
    eager_outputs: Optional[int] = None

    # ------------------------------------------------------------------------ declaration

    def __post_init__(self):
        head, arrow, outputs = self.signature.partition("->")
        name, paren, inputs = head.strip().partition("(")
        if not (arrow and paren and inputs.endswith(")")):
            raise ValueError(f"op table: expected 'name(<inputs>) -> (<outputs>)', got "
                             f"{self.signature!r}")
        self.name, self.inputs = name.strip(), inputs[:-1]
        self.outputs = outputs.strip().strip("()")
        if self.name in OPS:
            raise ValueError(f"op table: op {self.name!r} declared twice")
        self.args = _parse(self.inputs)
        self.input_names = tuple(a.name for a in self.args)
        self.output_names = tuple(o.strip() for o in self.outputs.split(",") if o.strip())
        self.kernel_family = self.kernel_family or self.family
        if self.kernel_args is None:
            self.kernel_args = tuple(n for n in self.input_names if n != "backend")
        self._defaults = {a.name: a.default for a in self.args if a.default is not _NO_DEFAULT}
        self._check_names()
        self._consts = tuple(a.name for a in self.args if not a.is_tensor)
        self._tensor_idx = tuple(i for i, a in enumerate(self.args) if a.is_tensor)
        self._forward_name = f"{self.name}_forward"
        self._backward_name = f"{self.name}_backward"
        # positions of the tensor inputs that get no gradient (detached when they need it)
        self._detach = tuple(i for i, a in enumerate(self.args)
                             if a.is_tensor and a.name not in self.differentiable)
        self.op = self._custom_op(self.name, self.args, self.output_names, self._forward_impl,
                                  self._fake_impl)
        if self.backward is not None:
            self._build_backward()
        if self.parallel is not None:
            self._build_parallel()
        if self.grad_in_forward is not None:
            self._build_gif()
        if self.eager:
            self._build_eager()
        OPS[self.name] = self

    def _check_names(self) -> None:
        """Every name a declaration uses must exist: a typo fails at import, not at the
        first backward."""
        known = set(self.input_names) | set(self.output_names) | set(self.derive)
        if self.parallel is not None:
            known |= set(self.parallel.extra_outputs) | {"group"}
        given = tuple(p for p in self.grad_if.values() if isinstance(p, str))
        for name in self.kernel_args + self.saved + self.nondiff + tuple(self.grad_if) + given:
            if name not in known:
                raise ValueError(f"op table: {self.name}: unknown name {name!r}")
        for name in self.differentiable:
            if name not in self.input_names:
                raise ValueError(f"op table: {self.name}: differentiable {name!r} is not an "
                                 f"input")
        gif = self.grad_in_forward
        if gif is not None:
            for wrt in gif.wrts:
                if wrt not in self.differentiable:
                    raise ValueError(f"op table: {self.name}: grad_in_forward.wrt {wrt!r} "
                                     f"is not a differentiable input")
            if len(gif.wrts) > 1 and self.inplace is not None:
                raise ValueError(f"op table: {self.name}: grad_in_forward with several wrt "
                                 f"inputs {gif.wrts} cannot be combined with inplace")
            if gif.loss not in self.output_names or set(self.output_names) - \
                    set(self.nondiff) != {gif.loss}:
                raise ValueError(f"op table: {self.name}: grad_in_forward.loss {gif.loss!r} "
                                 f"must be the one output not declared nondiff")
        if self.backward is not None:
            extra = ({f"grad_{o}" for o in self.output_names}
                     | {f"need_{d}" for d in self.differentiable} | {"inplace"})
            for name in self.backward.args:
                if name not in known | extra:
                    raise ValueError(f"op table: {self.name}: backward argument {name!r} is "
                                     f"neither an input, an output, a derived value, "
                                     f"grad_<output> nor need_<input>")
                if (name in self.input_names or name in self.output_names) and \
                        self._is_tensor(name) and name not in self.saved:
                    raise ValueError(f"op table: {self.name}: backward needs tensor {name!r} "
                                     f"but it is not saved")
            for name in self.backward.grads:
                if name not in self.differentiable:
                    raise ValueError(f"op table: {self.name}: backward returns the gradient "
                                     f"of {name!r}, which is not differentiable")
        if self.eager_outputs is not None:
            n = self.eager_outputs
            if not 1 <= n <= len(self.output_names):
                raise ValueError(f"op table: {self.name}: eager_outputs must be in [1, "
                                 f"{len(self.output_names)}], got {n}")
            for o in self.output_names[n:]:
                # an output the eager Function does not return: no gradient flows into it,
                # so it must be non-differentiable, its upstream gradient unread, unviewed
                grads = () if self.backward is None else self.backward.args
                if o not in self.nondiff or f"grad_{o}" in grads or o in self.grad_if:
                    raise ValueError(f"op table: {self.name}: output {o!r} beyond "
                                     f"eager_outputs must be nondiff, without grad_if, and "
                                     f"its gradient unread by backward")

    def _is_tensor(self, name: str) -> bool:
        for a in self.args:
            if a.name == name:
                return a.is_tensor
        return name in self.output_names or (self.parallel is not None
                                             and name in self.parallel.extra_outputs)

    # ----------------------------------------------------------------- the custom ops

    @staticmethod
    def _custom_op(name: str, args, outputs, impl, fake, mutable: Optional[str] = None):
        ret = "()" if not outputs else ("Tensor" if len(outputs) == 1
                                        else "(" + ", ".join(["Tensor"] * len(outputs)) + ")")
        schema = "(" + ", ".join(a.schema(a.name == mutable) for a in args) + ") -> " + ret
        op = torch.library.custom_op(f"rlkernels::{name}", impl,
                                     mutates_args=(mutable,) if mutable else (), schema=schema)
        op.register_fake(fake)
        return op

    def _bind(self, args) -> dict:
        """The op's positional arguments (defaults filled) by name. Internally the values
        travel as plain dicts (the hot path of the small ops); callbacks get ``Args.of``."""
        d = dict(self._defaults)
        d.update(zip(self.input_names, args))
        return d

    def bind(self, args) -> Args:
        """The op's positional arguments (defaults filled) by name, as :class:`Args`."""
        return Args.of(self._bind(args))

    def _derived(self, a: dict, name: str):
        if name in a:
            return a[name]
        sources, fn = self.derive[name]
        value = a[name] = fn(*(a[s] for s in sources))
        return value

    def kernel(self, backend: str, fn: str, family: Optional[str] = None):
        return backends.kernel(backend, family or self.kernel_family, fn)

    def _forward_from(self, a: dict):
        fn = self.kernel(a["backend"], self._forward_name)
        return fn(*[a[n] if n in a else self._derived(a, n) for n in self.kernel_args])

    def _forward_impl(self, *args):
        return self._forward_from(self._bind(args))

    def _fake_impl(self, *args):
        return self.fake(self.bind(args))

    # -------------------------------------------------------------------- autograd

    def _setup(self, ctx, inputs, output, save_as: Optional[Dict[str, str]] = None,
               output_names: Optional[Tuple[str, ...]] = None):
        self._setup_args(ctx, self._bind(inputs), output, save_as, output_names)

    def _setup_args(self, ctx, a: dict, output, save_as: Optional[Dict[str, str]] = None,
                    output_names: Optional[Tuple[str, ...]] = None):
        outs = output if isinstance(output, (tuple, list)) else (output,)
        o = dict(zip(output_names or self.output_names, outs))
        tensors = []
        for name in self.saved:
            if save_as and name in save_as and a.get(name) is not None:
                tensors.append(o[save_as[name]])
            else:
                tensors.append(a[name] if name in a else o[name])
        ctx.save_for_backward(*tensors)
        ctx.rlk_args = {n: a[n] for n in self._consts}
        nondiff = [o[n] for n in self.nondiff]
        if save_as:
            nondiff += [o[n] for n in self.parallel.extra_outputs]
        if nondiff:
            ctx.mark_non_differentiable(*nondiff)

    def _backward_values(self, ctx, grads, input_names, output_names
                         ) -> Tuple[dict, Dict[str, bool]]:
        need = dict(zip(input_names, ctx.needs_input_grad))
        a = dict(ctx.rlk_args)
        a.update(zip(self.saved, ctx.saved_tensors))
        for name, g in zip(output_names, grads):
            if self.contiguous_grads and g is not None:
                g = g.contiguous()
            keep = self.grad_if.get(name)
            if isinstance(keep, str):
                keep = a[keep] is not None and a[keep] is not False
            elif keep is not None:
                keep = keep(Args.of(a))
            a[f"grad_{name}"] = g if keep is None or keep else None
        for name in self.differentiable:
            a[f"need_{name}"] = bool(need.get(name, False))
        return a, need

    def grad_from(self, input_names=None, output_names=None, backward_op=None,
                  vp: bool = False):
        """The backward formula for ``register_autograd`` / ``autograd.Function``."""
        input_names = input_names or self.input_names
        output_names = output_names or self.output_names
        backward_op = backward_op or (lambda: self._bw_op)
        no_grads = tuple(None for _ in input_names)

        def grad(ctx, *grads):
            a, need = self._backward_values(ctx, grads, input_names, output_names)
            if not any(need.get(n, False) for n in self.backward.grads):
                return no_grads
            return self._grad_of(a, need, input_names, backward_op, vp)

        return grad

    def _grad_of(self, a: dict, need: Dict[str, bool], input_names, backward_op,
                 vp: bool = False) -> tuple:
        """The gradients of ``input_names`` from the backward values ``a`` (by name): the
        in-place backward op, the kernel directly (plain eager), or the backward op."""
        if self.inplace is not None and a[self.inplace[0]]:
            op = self._bw_inplace_op
            op(*(a[n] for n in op.rlk_arg_names))
            results = {self.inplace[1]: a[self.inplace[1]]}  # its storage now holds it
        elif self.eager and not vp and eager(*(a[n] for n in self.saved)):
            results = dict(zip(self.backward.grads,
                               self._backward_from(a, False, none_ok=True)))
        else:
            op = backward_op()
            out = op(*(a[n] for n in op.rlk_arg_names))
            results = dict(zip(self.backward.grads,
                               out if isinstance(out, (tuple, list)) else (out,)))
        return tuple(results.get(n) if need.get(n) else None for n in input_names)

    def _backward_from(self, a: dict, inplace: bool, reduce=None, none_ok: bool = False):
        """Run the backward kernel; gradients in their input's dtype, an empty tensor for
        one not computed (custom ops cannot return None; the eager path, ``none_ok``, takes
        None and saves the allocation)."""
        a["inplace"] = inplace
        fn = self.kernel(a["backend"], self._backward_name)
        out = fn(*[a[n] if n in a else self._derived(a, n) for n in self.backward.args])
        if inplace:
            return ()
        out = out if isinstance(out, (tuple, list)) else (out,)
        grads = {}
        for name, g in zip(self.backward.grads, out):
            x = a[name]
            if g is None or x is None or not a.get(f"need_{name}", True):
                g = None if none_ok else (
                    x if x is not None else a[self.backward.grads[0]]).new_empty(0)
            elif g.dtype != x.dtype:
                g = g.to(x.dtype)
            grads[name] = g
        if reduce is not None:
            grads = reduce(Args.of(a), grads)
        return tuple(grads[n] for n in self.backward.grads)

    def _fake_backward(self, a: dict):
        grads = []
        for name in self.backward.grads:
            x = a[name]
            if x is None or not a.get(f"need_{name}", True):
                x = a[self.backward.grads[0]].new_empty(0)
            grads.append(torch.empty_like(x))
        return tuple(grads) if len(grads) > 1 else grads[0]

    def _backward_arg_names(self, extra: Tuple[str, ...] = ()) -> Tuple[str, ...]:
        """The backward custom op's arguments: the kernel's, with each derived value
        replaced by its sources, plus ``extra``, then ``backend``."""
        names = []
        for n in self.backward.args + extra:
            for m in (self.derive[n][0] if n in self.derive else (n,)):
                if m != "inplace" and m not in names:
                    names.append(m)
        return tuple(names) + ("backend",)

    def _arg_of(self, name: str) -> _Arg:
        for a in self.args:
            if a.name == name:
                return _Arg(name, a.type)  # no default: the backward op gets every value
        if name.startswith("grad_"):
            return _Arg(name, "Tensor?")
        if name.startswith("need_"):
            return _Arg(name, "bool")
        if name == "group":
            return _Arg(name, "int")
        return _Arg(name, "Tensor")  # a saved output

    def _backward_op(self, name: str, arg_names, inplace: bool, reduce=None):
        args = tuple(self._arg_of(n) for n in arg_names)

        def impl(*values):
            out = self._backward_from(dict(zip(arg_names, values)), inplace, reduce)
            return out[0] if len(out) == 1 else out

        def fake(*values):
            return None if inplace else self._fake_backward(dict(zip(arg_names, values)))

        def impl_inplace(*values):
            impl(*values)

        grads = () if inplace else self.backward.grads
        op = self._custom_op(name, args, grads, impl_inplace if inplace else impl, fake,
                             mutable=self.inplace[1] if inplace else None)
        op.rlk_arg_names = arg_names
        return op

    def _build_backward(self) -> None:
        names = self._backward_arg_names()
        self._bw_op = self._backward_op(f"{self.name}_backward", names, False)
        if self.inplace is not None:
            self._bw_inplace_op = self._backward_op(f"{self.name}_backward_", names, True)
        self.op.register_autograd(self.grad_from(), setup_context=self._setup)

    # ---------------------------------------------------------- vocabulary parallelism

    def _build_parallel(self) -> None:
        p = self.parallel
        i = self.input_names.index("backend")
        vp_args = self.args[:i] + (_Arg("group", "int"),) + self.args[i:]
        vp_names = tuple(a.name for a in vp_args)
        vp_outputs = self.output_names + p.extra_outputs

        def bind(values) -> dict:
            a = dict(self._defaults)
            a.update(zip(vp_names, values))
            return a

        def impl(*values):
            a = bind(values)
            return p.forward(Args.of(a),
                             lambda fn, family=None: self.kernel(a["backend"], fn, family))

        def fake(*values):
            a = Args.of(bind(values))
            return tuple(self.fake(a)) + (tuple(p.extra_fake(a)) if p.extra_fake else ())

        self.vp_op = self._custom_op(f"{self.name}_vp", vp_args, vp_outputs, impl, fake)
        self._vp_index = i
        if self.backward is None:
            return

        def setup(ctx, inputs, output):
            a = bind(inputs)
            self._setup(ctx, tuple(a[n] for n in self.input_names), output, p.save_as,
                        vp_outputs)
            ctx.rlk_args["group"] = a["group"]

        backward_op = lambda: self._bw_op  # noqa: E731
        if p.reduce is not None:
            names = self._backward_arg_names(
                ("group",) + tuple(f"need_{d}" for d in self.differentiable))
            self._bw_vp_op = self._backward_op(f"{self.name}_vp_backward", names, False,
                                               p.reduce)
            backward_op = lambda: self._bw_vp_op  # noqa: E731
        self.vp_op.register_autograd(self.grad_from(vp_names, vp_outputs, backward_op, vp=True),
                                     setup_context=setup)

    # -------------------------------------------------------- gradient in the forward

    def _gif_schema(self, args):
        """The gif ops' arguments and gradient outputs: the op's arguments (``args``), plus
        ``bool need_<wrt>`` per input with several ``wrt`` (one: it always needs it)."""
        wrts = self.grad_in_forward.wrts
        if len(wrts) == 1:
            return tuple(args), ("grad",)
        return (tuple(args) + tuple(_Arg(f"need_{w}", "bool", True) for w in wrts),
                tuple(f"grad_{w}" for w in wrts))

    def _gif_fake_grads(self, a) -> tuple:
        """Empty gradients of the ``wrt`` inputs: the input's shape, or ``[0]`` where the
        input is None or needs no gradient."""
        wrts = self.grad_in_forward.wrts
        first = next(a[w] for w in wrts if a[w] is not None)
        out = []
        for w in wrts:
            x = a[w]
            needed = len(wrts) == 1 or a[f"need_{w}"]
            out.append(x.new_empty(x.shape) if x is not None and needed else first.new_empty(0))
        return tuple(out)

    def _build_gif(self) -> None:
        gif = self.grad_in_forward
        wrts = gif.wrts
        self._gif_wrt = tuple(self.input_names.index(w) for w in wrts)
        self._gif_loss = self.output_names.index(gif.loss)
        args, grads = self._gif_schema(self.args)
        names = tuple(a.name for a in args)
        # (the dispatcher drops trailing arguments equal to their defaults)
        defaults = {a.name: a.default for a in args if a.default is not _NO_DEFAULT}
        k = len(grads)

        def bind(values) -> dict:
            a = dict(defaults)
            a.update(zip(names, values))
            return a

        def run(values, inplace: bool):
            a = bind(values)
            kernel = lambda fn, family=None: self.kernel(a["backend"], fn, family)  # noqa
            return tuple(gif.forward(Args.of(a), kernel, a[wrts[0]] if inplace else None))

        def fake(*values):
            a = bind(values)
            return tuple(self.fake(Args.of(a))) + self._gif_fake_grads(a)

        self._gif_op = self._custom_op(f"{self.name}_gif", args, self.output_names + grads,
                                       lambda *v: run(v, False), fake)
        if self.inplace is not None:
            self._gif_inplace_op = self._custom_op(
                f"{self.name}_gif_", args, self.output_names,
                lambda *v: run(v, True)[:-1], lambda *v: fake(*v)[:-1], mutable=wrts[0])

        if self.parallel is not None and gif.parallel is not None:
            self._build_gif_vp()

        def scale(grad, g, backend):
            backends.kernel(backend, gif.family, f"{self.name}_gif_scale_")(grad, g)

        scale_op = self._custom_op(
            f"{self.name}_gif_scale_", (_Arg("grad", "Tensor"), _Arg("g", "Tensor"),
                                        _Arg("backend", "str")),
            (), scale, lambda grad, g, backend: None, mutable="grad")
        # (x_1.., value, grad_1.., backend): one input and its gradient per wrt
        x_types = {a.name: a.type for a in self.args}
        attach_args = (tuple(_Arg("x" if k == 1 else f"x_{w}", x_types[w]) for w in wrts)
                       + (_Arg("value", "Tensor"),)
                       + tuple(_Arg("grad" if k == 1 else f"grad_{w}", "Tensor")
                               for w in wrts) + (_Arg("backend", "str"),))
        self._gif_attach_op = self._custom_op(
            f"{self.name}_gif_attach", attach_args, ("value",),
            lambda *v: v[k].clone(), lambda *v: torch.empty_like(v[k]))

        def setup(ctx, inputs, output):
            ctx.save_for_backward(*inputs[k + 1:2 * k + 1])
            ctx.rlk_backend, ctx.rlk_used = inputs[-1], False

        def backward(ctx, g):
            none = (None,) * (2 * k + 2)
            if not any(ctx.needs_input_grad[:k]):
                return none
            if ctx.rlk_used:
                raise RuntimeError(f"{self.name}(grad_in_forward=True): the gradient formed "
                                   f"in the forward is consumed by the first backward; "
                                   f"backpropagating twice (retain_graph=True) is not "
                                   f"supported")
            ctx.rlk_used = True
            out = []
            for need, grad in zip(ctx.needs_input_grad[:k], ctx.saved_tensors):
                if need:
                    scale_op(grad, g, ctx.rlk_backend)
                out.append(grad if need else None)
            return tuple(out) + none[k:]

        self._gif_attach_op.register_autograd(backward, setup_context=setup)

    def _build_gif_vp(self) -> None:
        gif, p = self.grad_in_forward, self.parallel
        wrts = gif.wrts
        i = self._vp_index
        vp_args, grads = self._gif_schema(self.args[:i] + (_Arg("group", "int"),)
                                          + self.args[i:])
        vp_names = tuple(a.name for a in vp_args)
        defaults = {a.name: a.default for a in vp_args if a.default is not _NO_DEFAULT}
        outputs = self.output_names + p.extra_outputs

        def bind(values) -> dict:
            a = dict(defaults)
            a.update(zip(vp_names, values))
            return a

        def run(values, inplace: bool):
            a = bind(values)
            kernel = lambda fn, family=None: self.kernel(a["backend"], fn, family)  # noqa
            return tuple(gif.parallel(Args.of(a), kernel, a[wrts[0]] if inplace else None))

        def fake(*values):
            a = bind(values)
            return (tuple(self.fake(Args.of(a)))
                    + (tuple(p.extra_fake(Args.of(a))) if p.extra_fake else ())
                    + self._gif_fake_grads(a))

        self._gif_vp_op = self._custom_op(f"{self.name}_gif_vp", vp_args, outputs + grads,
                                          lambda *v: run(v, False), fake)
        if self.inplace is not None:
            self._gif_vp_inplace_op = self._custom_op(
                f"{self.name}_gif_vp_", vp_args, outputs, lambda *v: run(v, True)[:-1],
                lambda *v: fake(*v)[:-1], mutable=wrts[0])

    def _call_gif(self, args, group: Optional[int] = None):
        """``op(..., grad_in_forward=True)``: the gif forward, then the attach op that makes
        the loss differentiable w.r.t. the ``wrt`` inputs. Without anything to differentiate
        (no grad mode, or no ``wrt`` input needs a gradient) the plain op runs: no gradient
        buffer. ``group``: the vocabulary-parallel form (its outputs include the extra
        ones)."""
        xs = [args[j] if j < len(args) else self._defaults.get(self.input_names[j])
              for j in self._gif_wrt]
        needs = [x is not None and x.requires_grad for x in xs]
        if not (torch.is_grad_enabled() and any(needs)):
            if group is not None:
                i = self._vp_index
                return self.vp_op(*args[:i], group, *args[i:])
            return self.op(*args)
        a = self._bind(args)
        values = [a[n] for n in self.input_names]
        for j, x in zip(self._gif_wrt, xs):
            if x is not None:
                values[j] = x.detach()  # the gif ops are below autograd
        if len(xs) > 1:
            values += needs
        inplace = self.inplace is not None and a[self.inplace[0]]
        if group is not None:
            i = self._vp_index
            values = values[:i] + [group] + values[i:]
            ops = (self._gif_vp_inplace_op if inplace else None, self._gif_vp_op)
        else:
            ops = (self._gif_inplace_op if inplace else None, self._gif_op)
        if inplace:
            outs, grads = list(ops[0](*values)), [xs[0]]  # x's storage holds it now
        else:
            outs = list(ops[1](*values))
            outs, grads = outs[:-len(xs)], outs[-len(xs):]
        i = self._gif_loss
        outs[i] = self._gif_attach_op(*xs, outs[i], *grads, a["backend"])
        return tuple(outs) if len(outs) > 1 else outs[0]

    # ------------------------------------------------------------------- eager path
    #
    # A plain eager call (``ops/_eager.py``) runs through one ``autograd.Function`` per op
    # whose forward and backward index tuples instead of building dicts by name: the plan
    # below turns every name of the declaration into a position once, at import. What a
    # backward needs travels on ``ctx`` as saved tensors plus one tuple of constants (the
    # non-tensor inputs and derived values); the backward decodes no options and repeats no
    # check. Both paths call the same backend functions with the same arguments.

    def _build_eager(self) -> None:
        names = self.input_names
        pool = list(names)  # forward values: the inputs, then the derived values used
        used = set(self.kernel_args) | set(self.saved)
        if self.backward is not None:
            used |= set(self.backward.args)
        self._e_derive = []
        for n, (sources, fn) in self.derive.items():
            if n in used:
                self._e_derive.append((fn, tuple(pool.index(s) for s in sources)))
                pool.append(n)
        self._e_pool = tuple(pool)
        self._e_n = len(names)
        self._e_defaults = tuple(self._defaults.get(n, _NO_DEFAULT) for n in names)
        self._e_backend = names.index("backend")
        self._e_kargs = tuple(pool.index(n) for n in self.kernel_args)
        self._e_kget = _getter(self._e_kargs)
        full = pool + list(self.output_names)  # inputs win over outputs, as in _setup_args
        self._e_saved = tuple(full.index(n) for n in self.saved)
        self._e_sget = _getter(self._e_saved)
        self._e_vsaved = frozenset(self.output_names.index(n) for n in self.saved
                                   if n in self.output_names and n not in names)
        self._e_mods = {}  # backend -> kernel module
        self._e_ndb = {}  # backend -> its module's ND_ROWS
        # the outputs the eager Function returns (eager_outputs); the others are saved only
        self._e_nout = len(self.output_names) if self.eager_outputs is None \
            else self.eager_outputs
        self._e_nondiff = tuple(i for i in (self.output_names.index(n) for n in self.nondiff)
                                if i < self._e_nout)
        # the Function's inputs: the differentiable tensors (what autograd connects), then
        # one tuple (every input in schema order, the output views, the input maps): a
        # constant or a tensor without a gradient costs ``apply`` and the engine nothing
        self._e_diff = tuple(names.index(n) for n in self.differentiable)
        self._e_diffpos = {i: k for k, i in enumerate(self._e_diff)}
        self._e_dget = _getter(self._e_diff)
        fn = self._function()
        self._fn = fn
        # Function.apply without its Python wrapper (signature binding for setup_context,
        # unwrapping of dead functorch wrappers): eager_mode() has ruled out functorch, and
        # _eager_call unwraps a differentiable input that was a functorch wrapper
        self._apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, fn)
        if self.backward is None:
            return
        consts = [n for n in self._consts]
        consts += [n for n in pool[len(names):] if n in self.backward.args and n not in consts]
        self._e_const_names = tuple(consts)
        self._e_consts = tuple(pool.index(n) for n in consts)
        self._e_cget = _getter(self._e_consts)
        outs, saved = self.output_names[:self._e_nout], self.saved
        n_s, n_c, n_o = len(saved), len(consts), len(outs)  # n_o: the Function's outputs

        diff = self.differentiable
        n_d = len(diff) + 1  # needs_input_grad: the differentiable inputs, the tuple

        def source(n: str) -> int:
            # positions in (saved tensors, constants, output grads, needs_input_grad, False)
            if n in saved:
                return saved.index(n)
            if n.startswith("grad_") and n[5:] in outs:
                return n_s + n_c + outs.index(n[5:])
            if n.startswith("need_") and n[5:] in diff:
                return n_s + n_c + n_o + diff.index(n[5:])
            if n == "inplace":  # after needs_input_grad
                return n_s + n_c + n_o + n_d
            return n_s + consts.index(n)

        self._e_bargs = tuple(source(n) for n in self.backward.args)
        self._e_bget = _getter(self._e_bargs)
        for n in self.backward.grads:
            if n not in saved:
                raise ValueError(f"op table: {self.name}: the input {n!r} of a gradient must "
                                 f"be saved (its dtype is the gradient's)")
        # (position among the Function's inputs, saved index) per gradient the kernel returns
        self._e_grads = tuple((diff.index(n), saved.index(n)) for n in self.backward.grads)
        self._e_none = (None,) * n_d
        # grad_if per output: None (always), an input's position (a name: kept when that
        # input is neither None nor False), or a predicate
        self._e_keep = None if not self.grad_if else tuple(
            pool.index(p) if isinstance(p, str) else p
            for p in (self.grad_if.get(o) for o in outs))
        self._e_bconst_backend = consts.index("backend")
        self._e_inplace = None if self.inplace is None else consts.index(self.inplace[0])
        # the upstream gradients of non-differentiable outputs stay None instead of zeros
        # (autograd's default materializes them): no backward argument reads one
        self._e_lazy_nondiff = not any(f"grad_{n}" in self.backward.args for n in self.nondiff)

    def _function(self):
        op = self

        def forward(ctx, *inputs):
            # the differentiable inputs (also in the tuple), then (inputs, views, maps)
            args, views, maps = inputs[-1]
            return op._eager_forward(ctx, args, views, maps)

        def backward(ctx, *grads):
            return op._eager_backward(ctx, grads)

        # named at creation: autograd names the backward node class after it
        # (``_<op>_fnBackward``, as the profiler and the graph show it)
        name = f"_{self.name}_fn"
        return type(torch.autograd.Function)(name, (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(backward),
            "__qualname__": name, "__module__": __name__})

    def _eager_forward(self, ctx, args, views=None, maps=None):
        """The forward kernel on ``args`` (every input, schema order); with ``ctx`` (the
        Function's), what backward needs saved on it, and the ``views`` and input ``maps``
        of ``__call__`` applied here: inside the Function, so that they add no node to the
        autograd graph (an output view is a tensor of its own to autograd, not an autograd
        view; a mapped input's gradient is reshaped back to the input's shape, as the view
        node would)."""
        vals = list(args)
        if maps:
            shapes = []
            for i, fn in maps:
                x = vals[i]
                vals[i] = fn(x)
                if vals[i] is not x and i in self._e_diffpos:
                    shapes.append((self._e_diffpos[i], x.shape))
            if ctx is not None:
                ctx.rlk_in = shapes
        for fn, src in self._e_derive:
            vals.append(fn(*[vals[i] for i in src]))
        kernel = self._e_kernel(vals[self._e_backend], self._forward_name)
        output = kernel(*self._e_kget(vals))
        if ctx is None:
            return output
        single = not isinstance(output, (tuple, list))
        outs = (output,) if single else output
        vals += outs
        ctx.save_for_backward(*self._e_sget(vals))
        if len(outs) > self._e_nout:  # eager_outputs: the rest were saved, not returned
            outs = outs[:self._e_nout]
            output = outs[0] if self._e_nout == 1 else tuple(outs)
            single = self._e_nout == 1
        if views:
            ctx.rlk_flat = tuple((i, outs[i].shape) for i, _ in views)
            outs = list(outs)
            for i, shape in views:
                if i in self._e_vsaved:
                    # backward saved this output: an autograd view, which shares the saved
                    # tensor's version counter (autograd forbids changing a view made in
                    # a Function in place: the saved values cannot change unseen)
                    outs[i] = _view(outs[i], shape)
                    continue
                with torch._C._AutoDispatchBelowADInplaceOrView():
                    # a view below autograd's view tracking: its own tensor to autograd (its
                    # upstream gradient is reshaped back in backward, as a view node
                    # would), and modifiable in place
                    outs[i] = _view(outs[i], shape)
            output = outs[0] if single else tuple(outs)
        if self._e_nondiff:
            ctx.mark_non_differentiable(*[outs[i] for i in self._e_nondiff])
        if self.backward is not None:
            ctx.rlk_consts = self._e_cget(vals)
            if self._e_lazy_nondiff:
                ctx._materialize_non_diff_grads = False
            if self._e_keep is not None:
                ctx.rlk_keep = keep = []
                a = None
                for p in self._e_keep:
                    if p is None:
                        keep.append(True)
                    elif type(p) is int:
                        v = vals[p]
                        keep.append(v is not None and v is not False)
                    else:
                        a = a or Args.of(dict(zip(self._e_pool, vals)))
                        keep.append(bool(p(a)))
        return output

    def _e_module(self, backend: str):
        """The kernel module of ``backend`` for this op's family, looked up once."""
        mod = self._e_mods.get(backend)
        if mod is None:
            mod = self._e_mods[backend] = backends._module(backend, self.kernel_family)
        return mod

    def _e_nd(self, backend: str) -> bool:
        """Whether ``backend``'s kernels of this family take the op's public shapes: the
        module says ``ND_ROWS = True`` (its kernels accept the inputs before the ``maps`` of
        :meth:`__call__`, e.g. ``[..., V]`` logits and ``[...]`` tokens, and return the
        outputs after its ``views``, e.g. per-token outputs ``[...]``, gradients in the
        inputs' shapes; ``[N, V]`` inputs stay accepted, as the custom op passes them). The
        eager path then makes no view or reshape of its own: each costs ~5-10 us of host
        time per call on a CPU like the one issue 19 measured on."""
        nd = self._e_ndb.get(backend)
        if nd is None:
            # True (every op of the family), or the names of the ops that do
            flag = getattr(self._e_module(backend), "ND_ROWS", False)
            nd = flag is True or (isinstance(flag, frozenset) and self.name in flag)
            self._e_ndb[backend] = nd
        return nd

    def _e_kernel(self, backend: str, fn: str):
        """``backends.kernel`` with the module looked up once per backend (the function is
        read from the module on every call: a patched kernel is seen)."""
        kernel = getattr(self._e_module(backend), fn, None)
        if kernel is None:
            return backends.kernel(backend, self.kernel_family, fn)  # raises
        return kernel

    def _eager_backward(self, ctx, grads):
        nig = ctx.needs_input_grad
        for pos, _ in self._e_grads:
            if nig[pos]:
                break
        else:
            return self._e_none
        saved = ctx.saved_tensors
        consts = ctx.rlk_consts
        flat = getattr(ctx, "rlk_flat", None)
        if flat:
            grads = list(grads)
            for i, shape in flat:
                if grads[i] is not None:
                    grads[i] = _reshape(grads[i], shape)
        if self._e_keep is not None or self.contiguous_grads:
            grads = list(grads)
            for j, g in enumerate(grads):
                if g is not None and self.contiguous_grads:
                    grads[j] = g = g.contiguous()
                if self._e_keep is not None and not ctx.rlk_keep[j]:
                    grads[j] = None
        if (self._e_inplace is not None and consts[self._e_inplace]) or not eager(*saved):
            # the in-place backward op, or the backward op (something traces the backward)
            a = dict(zip(self._e_const_names, consts))
            a.update(zip(self.saved, saved))
            for name, g in zip(self.output_names, grads):
                a[f"grad_{name}"] = g
            need = dict(zip(self.differentiable, nig))
            for name in self.differentiable:
                a[f"need_{name}"] = bool(need[name])
            res = list(self._grad_of(a, need, self.differentiable, lambda: self._bw_op))
            res.append(None)
            return _unmapped(ctx, res)
        pool = saved + consts + tuple(grads) + nig + (False,)
        kernel = self._e_kernel(consts[self._e_bconst_backend], self._backward_name)
        out = kernel(*self._e_bget(pool))
        if not isinstance(out, (tuple, list)):
            out = (out,)
        res = list(self._e_none)
        for (pos, si), g in zip(self._e_grads, out):
            if g is None or not nig[pos]:
                continue
            x = saved[si]
            if x is None:
                continue
            res[pos] = g if g.dtype == x.dtype else g.to(x.dtype)
        return _unmapped(ctx, res)

    def _eager_call(self, args, views, maps):
        """The plain eager call (``eager_mode()`` said so), after one pass over the tensor
        inputs: ``_NOT_PLAIN`` when one is not a plain tensor (the caller takes the custom
        op); the forward kernel when no gradient is to be recorded (an op without a
        backward, grad mode off, or no differentiable input that requires one: as the
        Function would, the outputs get no history), with grad mode off only while an
        input requires a gradient; else the Function, whose inputs are the differentiable
        tensors (constants that require a gradient detached)."""
        if len(args) != self._e_n:
            args = self._padded(args)
        if (views or maps) and self._e_nd(args[self._e_backend]):
            # the backend's kernels take the public shapes (ND_ROWS): no map, no view
            views = maps = None
        grad_mode = torch.is_grad_enabled()
        need = rg = False  # a differentiable input / any input requires a gradient
        detach = None
        for i in self._tensor_idx:
            x = args[i]
            if x is None:
                continue
            if type(x) not in PLAIN:
                return _NOT_PLAIN
            if grad_mode and x.requires_grad:
                rg = True
                if i in self._e_diffpos:
                    need = True
                else:
                    detach = detach or []
                    detach.append(i)
        if not need or self.backward is None:
            if not rg:  # nothing to record: grad mode stays as it is
                return _viewed(self._eager_forward(None, args, None, maps), views)
            torch._C._set_grad_enabled(False)
            try:
                return _viewed(self._eager_forward(None, args, None, maps), views)
            finally:
                torch._C._set_grad_enabled(True)
        if detach:
            args = list(args)
            for i in detach:
                args[i] = args[i].detach()
        diff = self._e_dget(args)
        for x in diff:
            if x is not None and _is_wrapped(x):
                # a functorch wrapper that outlived its transform: unwrapped, as
                # Function.apply's Python wrapper does with its inputs
                diff = [_unwrap_dead(x) if x is not None else x for x in diff]
                args = list(args)
                for i, x in zip(self._e_diff, diff):
                    args[i] = x
                break
        return self._apply(*diff, (args, views, maps))

    def _padded(self, args) -> tuple:
        """``args`` with the defaults of the trailing inputs not given."""
        args = tuple(args)
        if len(args) > self._e_n:
            raise TypeError(f"{self.name}: expected at most {self._e_n} arguments, got "
                            f"{len(args)}")
        tail = self._e_defaults[len(args):]
        for n, v in zip(self.input_names[len(args):], tail):
            if v is _NO_DEFAULT:
                raise TypeError(f"{self.name}: missing argument {n!r}")
        return args + tail

    # --------------------------------------------------------------------- calling

    def __call__(self, *args, group: Optional[int] = None, grad_in_forward: bool = False,
                 views: Optional[Tuple[Tuple[int, tuple], ...]] = None,
                 maps: Optional[Tuple[Tuple[int, Callable], ...]] = None):
        """Run the op on its positional arguments (schema order, ``backend`` included).
        ``group``: a registered process-group handle for the vocabulary-parallel form.
        ``grad_in_forward``: the :class:`GradInForward` form (not with ``group``).
        ``views``: ``((output index, shape), ...)``: those outputs are returned as
        ``output.view(shape)`` (the public shape of per-token outputs); on the eager path
        without a view node in the autograd graph (an output that backward saves stays an
        autograd view of the saved tensor: changing it in place raises). ``maps``:
        ``((input index, fn), ...)``: the op runs on ``fn(input)`` instead of that input
        (the ``[N, V]`` rows of ``[..., V]`` logits, a view or a copy); on the eager path
        inside the Function, so without a view node either."""
        if self.eager and group is None and not grad_in_forward and eager_mode():
            out = self._eager_call(args, views, maps)
            if out is not _NOT_PLAIN:
                return out
        if self._detach:
            args = self._constants(args)
        if maps:
            args = list(args)
            for i, fn in maps:
                args[i] = fn(args[i])
        if grad_in_forward:
            gif = self.grad_in_forward
            if gif is None or (group is not None and gif.parallel is None):
                raise ValueError(f"{self.name}: grad_in_forward=True is not supported"
                                 + (" with a process group" if group is not None else ""))
            return _viewed(self._call_gif(args, group), views)
        if group is not None:
            i = self._vp_index
            return _viewed(self.vp_op(*args[:i], group, *args[i:]), views)
        return _viewed(self.op(*args), views)

    def _constants(self, args):
        """Inputs that get no gradient, detached (only those that need it: no new tensor
        per call otherwise)."""
        out = None
        for i in self._detach:
            x = args[i] if i < len(args) else None
            if x is not None and x.requires_grad:
                if out is None:
                    out = list(args)
                out[i] = x.detach()
        return args if out is None else out

    def resolve(self, backend: Optional[str], where: Union[Tensor, torch.device],
                parallel: bool = False) -> str:
        """The concrete backend for this op (``backends.resolve``) on the device of ``where``
        (a tensor, or a ``torch.device``)."""
        if isinstance(where, Tensor):
            # is_cuda / is_cpu: ~3 k instructions per call less than device.type (which
            # makes a new string each time)
            kind = "cuda" if where.is_cuda else "cpu" if where.is_cpu else where.device.type
        else:
            kind = where.type
        return backends._resolve(backend, self.name, kind, parallel)

    def implemented_by(self, backend: str, parallel: bool = False) -> bool:
        """Declared for ``backend`` (in parallel form with ``parallel``). The kernels'
        existence is checked by tests/test_op_table.py."""
        if parallel:
            return self.parallel is not None and backend in self.parallel.backends
        return backend in self.backends


def _getter(idx: Tuple[int, ...]) -> Callable[[list], tuple]:
    """``lambda seq: tuple(seq[i] for i in idx)``, in C (``operator.itemgetter``)."""
    if len(idx) == 0:
        return lambda seq: ()
    if len(idx) == 1:
        i = idx[0]
        return lambda seq: (seq[i],)
    return operator.itemgetter(*idx)


def _viewed(output, views):
    """``output`` (one tensor or a tuple) with ``output[i].view(shape)`` for each
    ``(i, shape)`` of ``views``."""
    if not views:
        return output
    if isinstance(output, torch.Tensor):
        return output.view(views[0][1])
    outs = list(output)
    for i, shape in views:
        outs[i] = outs[i].view(shape)
    return tuple(outs)


def _view(x: Tensor, shape) -> Tensor:
    # sizes as separate ints: torch parses them faster than a torch.Size (~2 us here)
    return x.view(*shape) if len(shape) else x.view(())


def _reshape(x: Tensor, shape) -> Tensor:
    return x.reshape(*shape) if len(shape) else x.reshape(())


def _unmapped(ctx, res: list) -> tuple:
    """The gradients ``res`` of the Function's inputs, those of mapped inputs reshaped to
    the input's shape."""
    shapes = getattr(ctx, "rlk_in", None)
    if shapes:
        for i, shape in shapes:
            if res[i] is not None:
                res[i] = _reshape(res[i], shape)
    return tuple(res)
