"""Host overhead of rlkernels' own Python per public op (validation, dispatch, custom-op and
autograd plumbing), on CPU, one thread, tiny shapes.

    python benchmarks/host_overhead.py [--backend torch] [--repeat 7] [--number 200] [--md]

For each public op the script first runs the public call once with every backend kernel
function wrapped by a recorder (the outermost calls into ``rlkernels.reference.*``,
``rlkernels.triton.*`` or ``rlkernels.cuda.*`` functions, with their exact arguments), then
times

* ``public``: the public call (forward), or the public call plus ``torch.autograd.backward``
  on its differentiable outputs with precomputed upstream gradients (forward+backward);
* ``direct``: the recorded kernel calls replayed on the same argument objects, in order,
  under ``torch.no_grad`` (as the kernels run inside the ops);

and prints ``public - direct`` in microseconds; and

* ``stub``: the public call with every recorded kernel call replaced by a stand-in that returns
  that call's recorded result (a fresh ``detach`` of it) without running the kernel: the time
  of rlkernels' own Python (validation, dispatch, custom-op and autograd plumbing, and the
  autograd engine's backward bookkeeping) measured directly, not as the difference of two
  numbers each ~10x larger. On a machine shared with other jobs the difference's noise
  (+-50 us) hides the goal; the stub column is the one the goal is judged by.

Each time is the minimum over
``--repeat`` blocks of the mean of ``--number`` calls (the minimum is the estimate least
disturbed by other processes). ``own`` = stub - stand-ins (forward+backward: minus torch's
floor for the op's number of leaves too), and ``@issue`` scales it by 28 us / the
yardstick (a PPO forward in eager torch, 28 us where the issue measured); the floor and the
yardstick are timed in blocks alternating with the op's stub and stand-ins, because this
VM's speed drifts by up to 2x from minute to minute. The recording is generic, so the
script measures whatever plumbing the ops have, without knowing each kernel's signature. Goal (issue 19): at most 30 us
forward and 60 us forward+backward of overhead per op.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import inspect
import pkgutil
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch

import rlkernels as rk
from rlkernels import _checks

_BACKEND_PACKAGES = ("rlkernels.reference", "rlkernels.triton", "rlkernels.cuda")


# ------------------------------------------------------------------------------- recording

def _fresh(out):
    """A new tensor object per tensor of a recorded result (``detach``: same storage), so a
    replayed result never carries the autograd history a previous call gave it."""
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, (tuple, list)):
        return type(out)(_fresh(o) for o in out)
    return out


class _Recorder:
    """Wraps the public functions of the backend modules; records the outermost calls (and
    their results). In ``replay`` mode the outermost calls do not run: they return the
    recorded results in order (the ``stub`` measure: what is left is rlkernels' own Python)."""

    def __init__(self):
        self.calls: List[Tuple[Callable, tuple, dict]] = []
        self.results: List[object] = []
        self.depth = 0
        self.active = False
        self.replay = False
        self.cursor = 0
        self.wrappers: Dict[Callable, Callable] = {}  # kernel -> its recording wrapper

    def wrap(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def recorded(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            outer = self.depth == 0
            if outer and self.replay:
                i = self.cursor % len(self.calls)
                self.cursor += 1
                if self.calls[i][0] is not fn:
                    raise RuntimeError(f"host_overhead: replay expected "
                                       f"{self.calls[i][0].__qualname__}, got "
                                       f"{fn.__qualname__} (the op's kernel calls changed)")
                return _fresh(self.results[i])
            self.depth += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                self.depth -= 1
            if outer:
                self.calls.append((fn, args, kwargs))
                self.results.append(out)
            return out
        recorded.__wrapped_kernel__ = fn
        self.wrappers[fn] = recorded
        return recorded


def _backend_modules():
    for pkg_name in _BACKEND_PACKAGES:
        try:
            pkg = importlib.import_module(pkg_name)
        except Exception:  # the cuda launchers may not import without _C; triton without triton
            continue
        yield pkg
        for info in pkgutil.iter_modules(pkg.__path__):
            try:
                yield importlib.import_module(f"{pkg_name}.{info.name}")
            except Exception:
                continue


@contextlib.contextmanager
def _recording(rec: _Recorder):
    """Patch every plain function defined in a backend module (names not starting with
    ``_``, plus the private ones: launchers may be private) with the recorder."""
    patched = []
    for mod in _backend_modules():
        for name, obj in list(vars(mod).items()):
            if (inspect.isfunction(obj) and obj.__module__ == mod.__name__
                    and not name.startswith("__")):
                patched.append((mod, name, obj))
                setattr(mod, name, rec.wrap(obj))
    rec.active = True
    try:
        yield
    finally:
        rec.active = False
        for mod, name, obj in patched:
            setattr(mod, name, obj)


# ---------------------------------------------------------------------------------- timing

_CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
_clock = time.perf_counter


def _time_us(fn: Callable[[], object], repeat: int, number: int) -> float:
    return _time_interleaved([fn], repeat, number)[0]


def _time_interleaved(fns: List[Callable[[], object]], repeat: int,
                      number: int) -> List[float]:
    """Per function, the minimum over ``repeat`` blocks of the mean of ``number`` calls, in
    us; the blocks of the functions alternate (f, g, h, f, g, h, ...), so that numbers meant
    to be subtracted from one another see the same spells of a shared machine."""
    for fn in fns:
        fn()  # warm caches (custom-op dispatch tables, lru caches)
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for k, fn in enumerate(fns):
            t0 = _clock()
            for _ in range(number):
                fn()
            best[k] = min(best[k], (_clock() - t0) / number)
    return [b * 1e6 for b in best]


def _differentiable(out) -> List[torch.Tensor]:
    """The outputs that carry a gradient (metrics dicts and int outputs are skipped)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.requires_grad else []
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _differentiable(o)]
    return []


# ----------------------------------------------------------------------------------- cases

B, T, V, H, K = 4, 32, 64, 16, 8  # the issue's tiny shapes (B=4, T=32, V=64)
YARDSTICK_ISSUE_US = 28.0  # the yardstick where issue 19 measured its numbers


def _cases(backend: str) -> Dict[str, Callable[[bool], Callable[[], object]]]:
    """op name -> make(grad) -> a zero-argument public call on fixed inputs."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, grad=False, dtype=torch.float32, shift=0.0):
        # a leaf, as the floor's input: an input made by `randn(...) - 2` with grad would
        # add torch's own subtraction node to every backward timed
        x = torch.randn(*shape, generator=g, dtype=dtype)
        if shift:
            x += shift
        return x.requires_grad_(grad)

    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.9
    old = randn(B, T, shift=-2.0)
    adv = randn(B)
    ids = torch.randint(0, V, (B, T, K), generator=g)
    teacher = torch.randn(B, T, K, generator=g).log_softmax(-1)
    rewards = randn(B * 2)
    bk = dict(backend=backend)

    def logits(grad):
        return randn(B, T, V, grad=grad)

    return {
        "token_logprobs": lambda grad: functools.partial(
            rk.token_logprobs, logits(grad), tokens, **bk),
        "token_logprobs+entropy": lambda grad: functools.partial(
            rk.token_logprobs, logits(grad), tokens, return_entropy=True, **bk),
        "entropy": lambda grad: functools.partial(rk.entropy, logits(grad), **bk),
        "sparse_logprobs": lambda grad: functools.partial(
            rk.sparse_logprobs, logits(grad), ids, **bk),
        "sparse_kl": lambda grad: functools.partial(
            rk.sparse_kl, logits(grad), ids, teacher, **bk),
        "kl_divergence": lambda grad: functools.partial(
            rk.kl_divergence, logits(grad), logits(False), **bk),
        "kl_penalty": lambda grad: functools.partial(
            rk.kl_penalty, randn(B, T, grad=grad, shift=-2.0), old),
        "policy_loss": lambda grad: functools.partial(
            rk.policy_loss, randn(B, T, grad=grad, shift=-2.0), old, adv, mask, **bk),
        "policy_loss+kl+entropy": lambda grad: functools.partial(
            rk.policy_loss, randn(B, T, grad=grad, shift=-2.0), old, adv, mask, ref_logp=old,
            kl_coef=0.1, entropy=randn(B, T, grad=grad), entropy_coef=0.01, **bk),
        "grpo_loss": lambda grad: functools.partial(
            rk.grpo_loss, logits(grad), tokens, old, adv, mask, **bk),
        "linear_token_logprobs": lambda grad: functools.partial(
            rk.linear_token_logprobs, randn(B, T, H, grad=grad), randn(V, H, grad=grad),
            tokens, **bk),
        "linear_grpo_loss": lambda grad: functools.partial(
            rk.linear_grpo_loss, randn(B, T, H, grad=grad), randn(V, H, grad=grad), tokens,
            old, adv, mask, **bk),
        "group_advantages": lambda grad: functools.partial(
            rk.group_advantages, rewards, group_size=2, **bk),
        "masked_whiten": lambda grad: functools.partial(
            rk.masked_whiten, randn(B, T, grad=grad), mask),
        "gae": lambda grad: functools.partial(rk.gae, randn(B, T), randn(B, T), mask,
                                              gamma=0.99, lam=0.95),
        "discounted_returns": lambda grad: functools.partial(
            rk.discounted_returns, randn(B, T), mask, gamma=0.99),
    }


def measure(op: str, make, grad: bool, repeat: int, number: int,
            yard: bool = False) -> Dict[str, float]:
    """The op's times (us per call; see the module docstring). ``yard``: the yardstick is
    timed too, in the blocks that alternate with the stub's (``yard_us``)."""
    call = make(grad)
    out = call()
    outs = _differentiable(out) if grad else []
    if grad and not outs:
        return {}  # the op has no gradient (group_advantages, gae, ...)
    grads = [torch.ones_like(o) for o in outs]
    leaves = _leaves(call)

    def public():
        for x in leaves:
            # as a training step finds them (optimizer.zero_grad(set_to_none=True)): the
            # backward hands its gradient to .grad instead of adding it to an old one (that
            # add is arithmetic on the input's size, not host overhead)
            x.grad = None
        res = call()
        if grad:
            torch.autograd.backward(_differentiable(res), grads)

    rec = _Recorder()
    with _recording(rec):
        public()
        calls = list(rec.calls)
        # stub: the public call with every kernel call replaced by its recorded result
        rec.replay, rec.cursor = True, 0

        def standins():
            # the stand-ins alone, through the same wrappers: the measuring apparatus's own
            # cost inside the stub (a kernel's real outputs cost at least as much to make)
            rec.cursor = 0
            for fn, args, kwargs in calls:
                rec.wrappers[fn](*args, **kwargs)

        # the stub, its stand-ins and torch's floor for the op's number of leaves, in
        # alternating blocks: the three numbers "own" is made of see the same machine
        fns = [public, standins, _floor_fns(max(len(leaves), 1))[1 if grad else 0]]
        t_stub, t_standins, t_floor, *t_yard = _time_interleaved(
            fns + [_yardstick_fn()] * yard, repeat, number)

    def direct():
        # no_grad: inside the ops the kernels run below autograd (a custom op's body, an
        # autograd.Function's forward and every backward); with grad mode on, a torch-backend
        # kernel given an input that requires grad would also record an autograd graph here
        with torch.no_grad():
            for fn, args, kwargs in calls:
                fn(*args, **kwargs)

    t_pub = _time_us(public, repeat, number)
    t_dir = _time_us(direct, repeat, number)
    return {"public_us": t_pub, "direct_us": t_dir, "overhead_us": t_pub - t_dir,
            "stub_us": t_stub, "standins_us": t_standins, "floor_us": t_floor,
            "kernel_calls": len(calls), "leaves": len(leaves),
            **({"yard_us": t_yard[0]} if yard else {})}


def _leaves(call) -> List[torch.Tensor]:
    """The tensors among a case's arguments that require grad."""
    values = list(getattr(call, "args", ())) + list(getattr(call, "keywords", {}).values())
    return [x for x in values if isinstance(x, torch.Tensor) and x.requires_grad]


class _Nothing(torch.autograd.Function):
    """The torch floor: an ``autograd.Function`` whose forward and backward do no work."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _FLOOR_OUT

    @staticmethod
    def backward(ctx, g):
        return _FLOOR_GRAD


class _Nothing2(torch.autograd.Function):
    """:class:`_Nothing` with two inputs: the floor of an op with two leaves."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return _FLOOR_OUT

    @staticmethod
    def backward(ctx, g):
        return _FLOOR_GRAD, _FLOOR_GRAD


def nothing(leaves: int):
    """The no-op Function with one input per leaf (1 or 2)."""
    return {1: _Nothing, 2: _Nothing2}[leaves]


_FLOOR_OUT = torch.zeros(())
_FLOOR_GRAD = torch.zeros(B, T)


def floor(repeat: int, number: int, leaves: int = 1) -> Dict[str, float]:
    """torch's own cost of one differentiable op call with ``leaves`` inputs that require
    grad: ``apply`` of a Function that does nothing (fwd), and that plus
    ``torch.autograd.backward`` through it (fwd+bwd: the engine hands each leaf its
    gradient, ~9 us per leaf here). No op can cost less host time; ``stub - floor`` (the
    floor of the op's number of leaves) is what rlkernels adds on top."""
    fwd, fwd_bwd = _floor_fns(leaves)
    return {"fwd": _time_us(fwd, repeat, number), "fwd+bwd": _time_us(fwd_bwd, repeat, number)}


def _floor_fns(leaves: int) -> Tuple[Callable[[], object], Callable[[], object]]:
    """The floor's forward and forward+backward calls (see :func:`floor`)."""
    xs = [torch.zeros(B, T, requires_grad=True) for _ in range(leaves)]
    one = torch.ones(())
    fn = nothing(leaves)

    def fwd():
        return fn.apply(*xs)

    def fwd_bwd():
        for x in xs:
            x.grad = None  # as public() in measure
        torch.autograd.backward([fn.apply(*xs)], [one])

    return fwd, fwd_bwd


def yardstick(repeat: int, number: int) -> float:
    """The issue's yardstick: a PPO policy-loss forward in plain eager torch at B=4, T=32
    (ratio, both clip branches, masked token mean; issue 19 measured ~28 us). Its time here
    says how fast this machine runs small torch calls, to compare the table with the goal."""
    return _time_us(_yardstick_fn(), repeat, number)


def _yardstick_fn() -> Callable[[], object]:
    """The yardstick's call (see :func:`yardstick`)."""
    g = torch.Generator().manual_seed(1)
    logp, old = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    adv, mask = torch.randn(B, 1, generator=g), torch.rand(B, T, generator=g) < 0.9

    def ppo():
        r = torch.exp(logp - old)
        pg = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.2))
        m = mask.to(pg.dtype)
        return (pg * m).sum() / m.sum().clamp_min(1.0)

    return ppo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--number", type=int, default=200)
    ap.add_argument("--ops", default="", help="comma list of case names (default: all)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure the table this many times; each cell is the minimum")
    ap.add_argument("--clock", choices=sorted(_CLOCKS), default="wall",
                    help="wall: time.perf_counter; thread: time.thread_time, the CPU time of "
                         "this thread only (on a loaded machine, waiting for a core is not "
                         "counted)")
    ap.add_argument("--cpu-data-checks", action="store_true",
                    help="keep the id range checks that run on CPU tensors only")
    args = ap.parse_args(argv)
    # the process-wide settings main changes, restored when it returns (tests call main)
    saved = (_clock, torch.get_num_threads(), _checks._cpu_checks)
    try:
        return _run(args)
    finally:
        _set_clock(saved[0])
        torch.set_num_threads(saved[1])
        _checks._cpu_checks = saved[2]


def _set_clock(clock) -> None:
    global _clock
    _clock = clock


def _run(args) -> int:
    _set_clock(_CLOCKS[args.clock])
    torch.set_num_threads(1)
    # a GPU call never reads the data outside debug mode; the CPU-only id range checks would
    # time a path no GPU call takes (--cpu-data-checks keeps them)
    _checks._cpu_checks = args.cpu_data_checks
    cases = _cases(args.backend)
    wanted = [o for o in args.ops.split(",") if o] or list(cases)
    unknown = sorted(set(wanted) - set(cases))
    if unknown:
        print(f"host_overhead: error: --ops: unknown {unknown}; known: {sorted(cases)}",
              file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, backend {args.backend}, 1 thread, B={B} T={T} V={V} "
          f"H={H} K={K}; min over {args.repeat} blocks of {args.number} calls; us per call "
          f"({args.clock} clock)")
    # --rounds: the whole table measured that many times, each cell the minimum over the
    # rounds (on a shared machine a slow spell then spoils one round, not the cell)
    base: Dict[int, Dict[str, float]] = {}  # leaves -> floor
    n_leaves = sorted({max(len(_leaves(cases[op](True))), 1) for op in wanted})
    yard = float("inf")
    res: Dict[Tuple[str, str], Dict[str, float]] = {}
    for _ in range(args.rounds):
        for n in n_leaves:
            for k, v in floor(args.repeat, args.number, n).items():
                cell = base.setdefault(n, {})
                cell[k] = min(cell.get(k, float("inf")), v)
        yard = min(yard, yardstick(args.repeat, args.number))
        for op in wanted:
            for mode, grad in (("fwd", False), ("fwd+bwd", True)):
                r = measure(op, cases[op], grad, args.repeat, args.number, yard=True)
                cell = res.setdefault((op, mode), {})
                for k, v in r.items():
                    cell[k] = min(cell.get(k, float("inf")), v)
    scale = YARDSTICK_ISSUE_US / yard
    floors = ", ".join(f"{n} {'leaves' if n > 1 else 'leaf'}: fwd {base[n]['fwd']:.0f} us, "
                       f"fwd+bwd {base[n]['fwd+bwd']:.0f} us" for n in n_leaves)
    print(f"torch floor (an autograd.Function doing nothing, one input per leaf of the op): "
          f"{floors}; yardstick (a PPO loss forward in eager torch, "
          f"{YARDSTICK_ISSUE_US:.0f} us where issue 19 measured): {yard:.0f} us, so x"
          f"{scale:.2f} to the issue's machine")
    print("own = stub - stand-ins (fwd), stub - stand-ins - floor of the op's leaves "
          "(fwd+bwd); @issue = own x 28 us / yardstick; the floor and the yardstick of each "
          "cell timed in blocks alternating with the op's stub and stand-ins (not the ones "
          "above)")
    print("| op | fwd public - direct | fwd stub | fwd stand-ins | **fwd own** | fwd own @issue "
          "| fwd+bwd public - direct | fwd+bwd stub | fwd+bwd stand-ins | **fwd+bwd own** | "
          "fwd+bwd own @issue |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    worst = {"fwd": 0.0, "fwd+bwd": 0.0}
    worst_issue = dict(worst)
    for op in wanted:
        cells = []
        for mode, grad in (("fwd", False), ("fwd+bwd", True)):
            r = res[(op, mode)]
            if not r:
                cells += ["n/a"] * 5
                continue
            # the floor measured with the op (alternating blocks), not the one printed above
            own = r["stub_us"] - r["standins_us"] - (r["floor_us"] if grad else 0.0)
            at_issue = own * YARDSTICK_ISSUE_US / r["yard_us"]
            worst[mode] = max(worst[mode], own)
            worst_issue[mode] = max(worst_issue[mode], at_issue)
            cells += [f"{r['overhead_us']:.0f}", f"{r['stub_us']:.0f}",
                      f"{r['standins_us']:.0f}", f"**{own:.0f}**", f"{at_issue:.0f}"]
        print(f"| {op} | " + " | ".join(cells) + " |", flush=True)
    print(f"worst own: fwd {worst['fwd']:.0f} us ({worst_issue['fwd']:.0f} @issue; goal <= "
          f"30), fwd+bwd {worst['fwd+bwd']:.0f} us ({worst_issue['fwd+bwd']:.0f} @issue; "
          f"goal <= 60)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
