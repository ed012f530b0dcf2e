"""Static sm_90a machine-code report of the vocabulary kernels, triton and cuda, on a machine
without a GPU: how close can each hot loop get to the DRAM bandwidth?

What it does, per kernel configuration the launchers would use at the realistic shape
(``N = 16384, V = 151936``, bf16 unless ``--dtype``):

* **triton**: captures every launch of ``rlkernels/triton/vocab.py`` and ``sparse.py`` (and
  the vocabulary half of ``grpo_loss``) with :func:`sm90_compile.capture_launches` on GPU-like
  meta tensors, compiles each with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` and
  disassembles its cubin with the bundled ``cuobjdump -sass``;
* **cuda**: compiles ``csrc/vocab.cu`` and ``csrc/sparse.cu`` with ``nvcc -O3 -arch=sm_90a
  -cubin`` (the flags of CMakeLists.txt) and disassembles every ``__global__`` instantiation;
  the template arguments are named from the ``template <...>`` line in front of each kernel
  in the source.

For each kernel it reports registers, spills (``spill B``: the spill store + load bytes of
``ptxas -v``; triton's own ptxas log is not kept, so its PTX goes through ptxas again with
the flags of triton's ``make_cubin``; cuda adds ``-Xptxas -v`` to nvcc) and ``local ops``
(``STL``/``LDL`` in the function: local memory, which is a spill or a local array such as a
state passed by reference), then finds the **hot loops** and counts, per loop iteration and
per thread: SASS instructions, bytes loaded and stored (``LDG``/``STG`` widths), ``BAR``,
``SHFL``, ``MUFU`` and wgmma (``HGMMA``) instructions.

Method and assumptions (state them with every number):

1. **Loops are back-edges** of the control-flow graph: an edge ``u -> h`` whose target ``h``
   dominates ``u`` (a natural loop; its body is every block that reaches ``u`` without
   passing ``h``). A backward ``BRA`` of out-of-line code that jumps back into the main flow
   is not a loop, nor the idle spin after ``EXIT``.
2. **Hot loops** are the loops that move global memory directly (not only through a loop
   nested in them) with 16-byte vector accesses (``LDG.E.128`` / ``STG.E.128``); when a
   kernel has none, its loops with any global access. Loops that only store (the padding
   rows' zero fill) are left out when a loop that loads exists; so is a loop nested in
   another (its instructions are on the outer loop's path), and a loop with fewer than a
   third of the common-path instructions of the kernel's largest one that loads a different
   number of bytes per iteration: that is per-row work (the sparse kernels' loops over a
   row's K ids run once at ``K <= BLOCK_K``), not a stream; a cheap first pass over the same
   inputs (same bytes) stays.
   The JSON lists every loop, so these choices can be checked. The loops of a misaligned
   row (scalar accesses) are reported (``misaligned`` column) but not in the ratio, which is
   the aligned common case.
3. **Per iteration = the common path**, from two walks from the loop's head to its
   back-edge:

   * the *layout path* (``instr (layout)``): falls through conditional branches and follows
     unconditional ones. Compilers move some rare sides out of line, but ptxas also lays a
     rare ``if`` body without ``else`` (a rebase of the running maximum, a ``0 * -inf``
     recompute, a sparse chunk holding an id) out as the fall-through, skipped by a taken
     branch, so this path counts it as if every iteration ran it;
   * the *min path*: the shortest path (fewest instructions) from the head back to it that
     moves exactly the layout path's global memory (same bytes loaded and stored, same
     number of 16-byte accesses). Every block it leaves out (``skipped`` in the JSON) is
     then the side of a conditional branch (``@P BRA`` per thread, ``BRA.U UP`` uniform)
     that moves no global memory, and the rule also requires that no left-out block holds
     a ``BAR``.

   The ratio uses the min path (``instr``). Rule: a block that moves no memory and that a
   branch in the loop can skip is taken to be rare. That holds for the vocabulary loops
   (their rare sides are the rebase, the recompute, the id / token chunk; the per-chunk
   work always loads and stores), not in general: a common side that does arithmetic
   only and that a rare branch skips would be under-counted, so check ``skipped`` against
   the source when a kernel's two counts differ. Where an alignment test sits inside the
   loop and the layout path took the scalar side, the walk is redone towards the 16-byte
   accesses. A nested loop's body on the path counts once. A Triton loop is straight line
   code (predication), so both paths are the whole body. Bytes, ``BAR``, ``SHFL``, ``MUFU``
   are counted on the counted path; ``NOP`` is not counted.
4. **The ratio** of a loop is its issue time over the DRAM time of the bytes it moves::

       issue  = I / (132 SMs x 4 warp-instructions/cycle x 1.98e9 cycles/s)   per warp-iteration
       dram   = 32 threads x B bytes / 3.0e12 B/s                               per warp-iteration
       ratio  = issue / dram = I x 3.0e12 / (32 x B x 1.04544e12) = I / (11.15 x B)

   with ``I`` the warp-instructions of one iteration and ``B`` the bytes one thread loads and
   stores in it. Above 1 the loop is instruction bound even if every SM issues every cycle;
   a kernel needs well under 1 (the brief: at most 0.5) to sustain ~90% of the bandwidth,
   since warps also stall and the issue slots are shared with address arithmetic. A
   kernel's ratio is the issue time of all its hot loops over the DRAM time of all the bytes
   they move (issue 18's convention: a two-pass kernel gets the mean of its passes, and
   ``passes`` says that it reads its input twice; a main loop and its remainder loop are
   weighted by their bytes per iteration, not by their trip counts). **Exclusive loops**:
   two loops of which neither reaches the other in the control-flow graph (back-edges of
   loops around both cut) are alternatives of one row, e.g. the copies ptxas makes of one
   loop for aligned / misaligned inputs and outputs behind a per-row test; they form a
   group, and a group counts once, by its member with the most 16-byte accesses (the
   aligned row; the costliest of ties); its other members go to the ``misaligned``
   column. Loops that follow each other (two passes) are in different groups and add up.
   ``passes`` counts the groups that load, ``(loops)`` the hot loops before grouping.
5. **MUFU** (``ex2``, ``lg2``, ``rcp``) issue from a 16 lanes/cycle/SM unit: the ``mufu``
   column is that pipe's time over the DRAM time, ``M x 3.0e12 / (16 x 132 x 1.98e9 x B)``.
6. Static counts: no latency, no occupancy, no L2 hits, no dual issue, no memory-level
   parallelism. They bound what the instruction stream allows; a GPU run decides.

Usage: ``python benchmarks/sass_report.py [--backend triton cuda] [--dtype bf16]
[--quick] [--dump DIR] [--json FILE] [--kernel REGEX]``. ``--dump DIR`` writes each kernel's
SASS (``DIR/<backend>/<name>.sass``) and ``DIR/index.json`` (op, backend, direction, dtype,
shape, config, the counts). ``--quick``: triton's token_logprobs kernels only (the test).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sm90_compile as S  # noqa: E402  (pops TRITON_INTERPRET before triton is imported)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = S.ROOT
N_ROWS, VOCAB, K_SPARSE = 16384, 151936, 64

# H100 SXM: SMs, warp-instructions issued per SM per cycle, boost clock, DRAM bandwidth, MUFU
# lanes per SM per cycle.
SMS, ISSUE, CLOCK, DRAM, MUFU_LANES = 132, 4, 1.98e9, 3.0e12, 16
TARGET = 0.5


def issue_dram_ratio(instr: float, nbytes: float) -> float:
    """Issue time of ``instr`` warp-instructions over the DRAM time of the ``nbytes`` each of
    the warp's 32 threads moves (module docstring, point 4)."""
    if nbytes <= 0:
        return float("inf")
    return (instr / (SMS * ISSUE * CLOCK)) / (32 * nbytes / DRAM)


def mufu_dram_ratio(mufu: float, nbytes: float) -> float:
    if nbytes <= 0:
        return float("inf")
    return (32 * mufu / (MUFU_LANES * SMS * CLOCK)) / (32 * nbytes / DRAM)


# ============================================================================== SASS parse

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_TARGET = re.compile(r"0x([0-9a-f]+)\s*$")


@dataclass
class Instr:
    addr: int
    pred: str
    op: str          # full opcode with modifiers, e.g. LDG.E.128.CONSTANT
    args: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    def branch_target(self) -> Optional[int]:
        if self.base not in ("BRA", "BRX", "JMP"):
            return None
        m = _TARGET.search(self.args)
        return int(m.group(1), 16) if m else None

    @property
    def conditional(self) -> bool:
        if self.pred and self.pred not in ("@PT",):
            return True
        # BRA with a predicate operand (BRA.U !UP0, 0x..) or BRA.DIV
        return "," in self.args or ".DIV" in self.op

    def mem_bytes(self) -> Tuple[int, int]:
        """(bytes loaded, bytes stored) from global memory by one thread."""
        kind = self.base
        if kind not in ("LDG", "STG", "LD", "ST", "LDGSTS", "RED", "ATOMG"):
            return 0, 0
        mods = self.op.split(".")[1:]
        width = 4
        for mod, w in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("16", 2),
                       ("U8", 1), ("S8", 1)):
            if mod in mods:
                width = w
                break
        if kind in ("LDG", "LD", "LDGSTS"):
            return width, 0
        return 0, width


def parse_sass(text: str) -> Dict[str, List[Instr]]:
    """``cuobjdump -sass`` output -> ``{mangled function name: instructions}``."""
    funcs: Dict[str, List[Instr]] = {}
    cur: Optional[List[Instr]] = None
    for line in text.splitlines():
        if "Function :" in line:
            cur = funcs.setdefault(line.split("Function :", 1)[1].strip(), [])
            continue
        m = _LINE.search(line)
        if m is None or cur is None:
            continue
        body = m.group(2).strip()
        pred = ""
        if body.startswith("@"):
            pred, body = body.split(None, 1)
        parts = body.split(None, 1)
        cur.append(Instr(int(m.group(1), 16), pred, parts[0], parts[1] if len(parts) > 1 else ""))
    return funcs


@dataclass
class Loop:
    head: int
    tail: int
    direct: bool = True           # moves global memory itself (not only through inner loops)
    instr: int = 0                # common-path warp-instructions per iteration
    static: int = 0               # every instruction of the range
    load_b: int = 0               # bytes per thread per iteration (common path)
    store_b: int = 0
    bar: int = 0
    shfl: int = 0
    mufu: int = 0
    hgmma: int = 0
    vector: bool = False          # 16-byte global accesses on the common path
    vec16: int = 0                # how many
    nested: bool = False          # holds a loop
    instr_layout: int = 0         # the layout path's instructions (point 3)
    instr_min: int = 0            # the shortest head -> back-edge path moving the same bytes
    skipped: List[str] = field(default_factory=list)  # blocks the counted path leaves out
    group: int = -1               # loops of one group are exclusive alternatives (point 4)

    @property
    def ratio(self) -> float:
        return issue_dram_ratio(self.instr, self.load_b + self.store_b)

    @property
    def mufu_ratio(self) -> float:
        return mufu_dram_ratio(self.mufu, self.load_b + self.store_b)


def _ends_block(ins: Instr) -> bool:
    return ins.base in ("BRA", "BRX", "JMP", "EXIT", "RET", "KILL")


def _blocks(code: List[Instr]):
    """Basic blocks ``[(first, end)]`` (instruction indices, end exclusive), the block of
    each instruction and each block's successors (a call returns: no edge)."""
    index = {ins.addr: i for i, ins in enumerate(code)}
    leaders = {0}
    for i, ins in enumerate(code):
        tgt = ins.branch_target()
        if tgt is not None and tgt in index:
            leaders.add(index[tgt])
        if _ends_block(ins) and i + 1 < len(code):
            leaders.add(i + 1)
    starts = sorted(leaders)
    blocks = list(zip(starts, starts[1:] + [len(code)]))
    block_of = [0] * len(code)
    for b, (s, e) in enumerate(blocks):
        for i in range(s, e):
            block_of[i] = b
    succ: List[List[int]] = []
    for b, (s, e) in enumerate(blocks):
        last, out = code[e - 1], []
        tgt = last.branch_target()
        if _ends_block(last):
            if tgt is not None and tgt in index:
                out.append(block_of[index[tgt]])
            if last.conditional and b + 1 < len(blocks):
                out.append(b + 1)
        elif b + 1 < len(blocks):
            out.append(b + 1)
        succ.append(out)
    return blocks, succ


def _dominators(succ: List[List[int]]) -> List[int]:
    """Dominator sets as bit masks (iterative data flow from block 0); unreachable blocks
    get 0."""
    n = len(succ)
    preds: List[List[int]] = [[] for _ in range(n)]
    for b, out in enumerate(succ):
        for c in out:
            preds[c].append(b)
    reach, stack = {0}, [0]
    while stack:
        for c in succ[stack.pop()]:
            if c not in reach:
                reach.add(c)
                stack.append(c)
    full = (1 << n) - 1
    dom = [full if b in reach else 0 for b in range(n)]
    dom[0] = 1
    changed = True
    while changed:
        changed = False
        for b in sorted(reach):
            if b == 0:
                continue
            d = full
            for p in preds[b]:
                if p in reach:
                    d &= dom[p]
            d |= 1 << b
            if d != dom[b]:
                dom[b], changed = d, True
    return dom


def natural_loops(code: List[Instr]):
    """``[(header block, body block set)]``: an edge ``u -> h`` where ``h`` dominates ``u``
    is a loop; its body is ``h`` and every block that reaches ``u`` without passing ``h``
    (out-of-line code that jumps back into a loop is not a loop)."""
    blocks, succ = _blocks(code)
    dom = _dominators(succ)
    preds: List[List[int]] = [[] for _ in blocks]
    for b, out in enumerate(succ):
        for c in out:
            preds[c].append(b)
    loops: Dict[int, set] = {}
    for u, out in enumerate(succ):
        for h in out:
            if dom[u] >> h & 1:
                body, stack = {h, u}, [u]
                while stack:
                    x = stack.pop()
                    if x == h:
                        continue
                    for p in preds[x]:
                        if p not in body:
                            body.add(p)
                            stack.append(p)
                loops.setdefault(h, set()).update(body)
    return blocks, succ, sorted(loops.items())


def common_path(code: List[Instr], blocks, succ, head: int, body: set,
                prefer=None) -> List[Instr]:
    """The layout path of one iteration: from the header, fall through every conditional
    branch that stays in the loop, follow every unconditional one, until the header comes
    back (compilers put the likely side of a branch in line and move rare sides out of
    line; an ``if`` body without ``else`` is counted, so a rare one over-counts).
    ``prefer(block, seen)`` (optional) ranks the two sides of a branch, lower first. Falls
    back to the whole body when the walk leaves the loop."""
    whole = [code[i] for b in sorted(body) for i in range(*blocks[b]) if code[i].base != "NOP"]
    path, cur, seen = [], head, set()
    while True:
        if cur in seen or cur not in body:
            return whole
        seen.add(cur)
        s, e = blocks[cur]
        path += [code[i] for i in range(s, e) if code[i].base != "NOP"]
        last = code[e - 1]
        out = succ[cur]
        if not out:
            return whole
        ft = cur + 1 if (not _ends_block(last) or last.conditional) else None
        tgt = [c for c in out if c != ft]
        if ft is not None and ft in body and ft != head:
            nxt = ft
            if prefer is not None and tgt and tgt[0] in body and tgt[0] != head:
                # an in-loop alignment test: take the side that reaches the 16-byte access
                if prefer(tgt[0], seen) < prefer(ft, seen):
                    nxt = tgt[0]
        elif tgt:
            nxt = tgt[0]
        else:
            nxt = ft
        if nxt == head:
            return path
        cur = nxt


def _distance_to(targets: set, succ, body: set, head: int):
    """``f(block, seen)``: blocks from ``block`` to the nearest unseen target inside the loop
    (not through its header); large when none."""
    def dist(start: int, seen: set) -> int:
        frontier, depth, visited = [start], 0, {start}
        while frontier:
            if any(b in targets and b not in seen for b in frontier):
                return depth
            nxt = []
            for b in frontier:
                for c in succ[b]:
                    if c in body and c != head and c not in visited:
                        visited.add(c)
                        nxt.append(c)
            frontier, depth = nxt, depth + 1
        return 1 << 30
    return dist


def _mem_sig(instrs) -> Tuple[int, int, int]:
    """(bytes loaded, bytes stored, 16-byte accesses) of a list of instructions."""
    ld = st = n16 = 0
    for c in instrs:
        a, b = c.mem_bytes()
        ld, st, n16 = ld + a, st + b, n16 + ((a or b) == 16)
    return ld, st, n16


def min_path(code: List[Instr], blocks, succ, head: int, body: set, want) -> Optional[
        List[int]]:
    """The shortest path (fewest non-``NOP`` instructions) from the loop's header back to it
    through the body whose global accesses are exactly ``want`` = (bytes loaded, bytes
    stored, 16-byte accesses), as a list of blocks; None when there is none. Every block
    such a path leaves out is the side of a conditional branch (``@P BRA`` per thread or
    ``BRA.U UP`` uniform) that moves no global memory and holds no barrier (module
    docstring, point 3)."""
    import heapq

    def cost(b):
        return sum(code[i].base != "NOP" for i in range(*blocks[b]))

    def sig(b):
        return _mem_sig(code[i] for i in range(*blocks[b]))

    start = (cost(head),) + sig(head)
    heap = [(start[0], start[1:], head, (head,))]
    best = {}
    while heap:
        c, m, b, path = heapq.heappop(heap)
        if best.get((b, m), 1 << 30) <= c:
            continue
        best[(b, m)] = c
        if any(m[i] > want[i] for i in range(3)):
            continue
        for nxt in succ[b]:
            if nxt == head:
                if tuple(m) == tuple(want):
                    return list(path)
                continue
            if nxt not in body or nxt in path:
                continue
            sm = sig(nxt)
            heapq.heappush(heap, (c + cost(nxt), tuple(x + y for x, y in zip(m, sm)), nxt,
                                  path + (nxt,)))
    return None


def _exclusive_groups(succ, loops_raw, heads: List[int]) -> Dict[int, int]:
    """``{loop header: group}``: two loops are exclusive alternatives when neither reaches
    the other (back-edges of loops holding both removed), e.g. the aligned, misaligned and
    zero-row loops in the branches of one per-row test; groups are the connected sets of
    that relation, numbered by their first header."""
    body_of = dict(loops_raw)

    def reaches(a: int, b: int) -> bool:
        # back-edges of the loops around both (a per-row loop), and of a itself, are cut
        cut = {(u, h) for h, bd in loops_raw if h == a or (a in bd and b in bd and h not in (a, b))
               for u in bd if h in succ[u]}
        seen, stack = {a}, [a]
        while stack:
            x = stack.pop()
            for c in succ[x]:
                if (x, c) in cut or c in seen:
                    continue
                if c == b:
                    return True
                seen.add(c)
                stack.append(c)
        return False

    group = {h: h for h in heads}

    def find(h):
        while group[h] != h:
            h = group[h]
        return h
    for i, a in enumerate(heads):
        for b in heads[i + 1:]:
            if b in body_of[a] or a in body_of[b]:
                continue
            if not reaches(a, b) and not reaches(b, a):
                group[find(b)] = find(a)
    return {h: find(h) for h in heads}


def find_loops(code: List[Instr]) -> List[Loop]:
    """Every natural loop of a function, with its common-path counts."""
    blocks, succ, loops_raw = natural_loops(code)
    loops = []
    for head, body in loops_raw:
        inner = set().union(*[b for h, b in loops_raw if h != head and b < body] or [set()])
        own = [code[i] for b in body - inner for i in range(*blocks[b])]
        path = common_path(code, blocks, succ, head, body)
        vec_blocks = {b for b in body if any(
            16 in code[i].mem_bytes() for i in range(*blocks[b]))}
        if vec_blocks and not any(16 in c.mem_bytes() for c in path):
            # the layout path took a misaligned side: walk again towards the vector accesses
            path = common_path(code, blocks, succ, head, body,
                               prefer=_distance_to(vec_blocks, succ, body, head))
        loop = Loop(code[blocks[head][0]].addr,
                    max(code[blocks[b][1] - 1].addr for b in body), nested=bool(inner),
                    static=sum(code[i].base != "NOP" for b in body for i in range(*blocks[b])))
        loop.direct = any(sum(c.mem_bytes()) for c in own)
        loop.instr = loop.instr_layout = loop.instr_min = len(path)
        want = _mem_sig(path)
        short = min_path(code, blocks, succ, head, body, want)
        if short is not None:
            short_code = [code[i] for b in short for i in range(*blocks[b])
                          if code[i].base != "NOP"]
            on_path = {id(c) for c in path}
            left = sorted({b for b in body if any(id(code[i]) in on_path
                                                  for i in range(*blocks[b]))} - set(short))
            bar_left = any(code[i].base == "BAR" for b in left for i in range(*blocks[b]))
            if len(short_code) < len(path) and not bar_left:
                loop.instr = loop.instr_min = len(short_code)
                loop.skipped = [hex(code[blocks[b][0]].addr) for b in left]
                path = short_code
        for c in path:
            ld, st = c.mem_bytes()
            loop.load_b += ld
            loop.store_b += st
            loop.vector |= (ld or st) == 16
            loop.vec16 += (ld or st) == 16
            loop.bar += c.base == "BAR"
            loop.shfl += c.base == "SHFL"
            loop.mufu += c.base == "MUFU"
            loop.hgmma += c.base in ("HGMMA", "WGMMA")
        loop.group = code[blocks[head][0]].addr
        loops.append(loop)
    groups = _exclusive_groups(succ, loops_raw, [h for h, _ in loops_raw])
    for loop, (h, _) in zip(loops, loops_raw):
        loop.group = code[blocks[groups[h]][0]].addr
    return loops


def _inside(a: Loop, b: Loop) -> bool:
    return a is not b and b.head <= a.head and a.tail <= b.tail


def hot_loops(loops: List[Loop]) -> Tuple[List[Loop], List[Loop]]:
    """``(hot, misaligned)``: the aligned streaming loops of the ratio, and the scalar
    streaming loops (module docstring, point 2)."""
    moving = [lp for lp in loops if lp.direct and lp.load_b + lp.store_b > 0]
    # a loop nested in a moving loop is on that loop's path already
    moving = [lp for lp in moving if not any(_inside(lp, o) for o in moving)]
    if moving:
        # per-row work, not a stream: loops far smaller than the largest (the loops over a
        # row's K ids, one iteration when K <= BLOCK_K)
        big = max(moving, key=lambda lp: lp.instr)
        moving = [lp for lp in moving
                  if 3 * lp.instr >= big.instr or lp.load_b == big.load_b]
    vec = [lp for lp in moving if lp.vector]
    hot = vec or moving
    if any(lp.load_b for lp in hot):
        hot = [lp for lp in hot if lp.load_b]
    # a misaligned row's chunk loop: scalar loads of at least a chunk per iteration
    scalar = [lp for lp in moving if not lp.vector and lp.load_b >= 8] if vec else []
    return hot, scalar


# ============================================================================== report rows

@dataclass
class Row:
    backend: str
    op: str
    direction: str
    kernel: str
    config: str
    dtype: str
    shape: str
    regs: int = -1
    stack: int = -1
    local_instr: int = -1     # STL/LDL in the function: local memory, spilled or not
    spill_b: int = -1         # spill stores + loads in bytes (ptxas -v); -1: unknown
    passes: int = 0
    loops_hot: int = 0        # hot loops, exclusive alternatives included
    instr_layout: int = 0     # the layout paths' instructions (point 3), for comparison
    instr: int = 0            # common-path instructions per iteration, summed over hot loops
    load_b: int = 0
    store_b: int = 0
    bar: int = 0
    shfl: int = 0
    mufu: int = 0
    hgmma: int = 0
    ratio: float = float("nan")
    mufu_ratio: float = float("nan")
    misaligned_ratio: float = float("nan")
    loops: List[dict] = field(default_factory=list)
    sass_file: str = ""
    error: str = ""


def analyze(code: List[Instr], row: Row) -> Row:
    loops = find_loops(code)
    hot, scalar = hot_loops(loops)
    row.local_instr = sum(c.base in ("STL", "LDL") for c in code)
    # of exclusive alternatives (one runs per row) one counts: the aligned one (most 16-byte
    # accesses; a variant with a misaligned input or output has fewer), the costliest if
    # several; the others go to the misaligned column
    chosen: Dict[int, Loop] = {}
    for lp in hot:
        old = chosen.get(lp.group)
        if old is None or (lp.vec16, lp.ratio) > (old.vec16, old.ratio):
            chosen[lp.group] = lp
    counted = list(chosen.values())
    scalar = scalar + [lp for lp in hot if lp.vec16 < chosen[lp.group].vec16]
    row.passes = sum(1 for lp in counted if lp.load_b)
    row.loops_hot = len(hot)
    for name in ("instr", "load_b", "store_b", "bar", "shfl", "mufu", "hgmma"):
        setattr(row, name, sum(getattr(lp, name) for lp in counted))
    row.instr_layout = sum(lp.instr_layout for lp in counted)
    # issue time of all hot loops over the DRAM time of all they move (two passes over the
    # same row: the mean; a main loop and its remainder loop: weighted by bytes per iteration)
    row.ratio = issue_dram_ratio(row.instr, row.load_b + row.store_b) if hot else float("nan")
    row.mufu_ratio = mufu_dram_ratio(row.mufu, row.load_b + row.store_b) if hot else float("nan")
    if scalar:
        row.misaligned_ratio = max(lp.ratio for lp in scalar)
    row.loops = [dict(asdict(lp), ratio=round(lp.ratio, 3), hot=any(lp is h for h in hot),
                      counted=any(lp is c for c in counted),
                      misaligned=any(lp is c for c in scalar), head=hex(lp.head),
                      tail=hex(lp.tail), group=hex(lp.group))
                 for lp in loops]
    return row


def _tool(name: str) -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def sass_of_cubin(cubin: bytes) -> Tuple[str, Dict[str, Tuple[int, int]]]:
    """``cuobjdump -sass`` text, and ``{function: (registers, stack bytes)}``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        return _sass_of_file(path)


def _sass_of_file(path: Path):
    sass = subprocess.run([_tool("cuobjdump"), "-sass", str(path)], capture_output=True,
                          text=True, check=True).stdout
    res = subprocess.run([_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True,
                         text=True, check=True).stdout
    usage, fn = {}, None
    for line in res.splitlines():
        if line.strip().startswith("Function "):
            fn = line.strip()[len("Function "):].rstrip(":")
        m = re.search(r"REG:(\d+) STACK:(\d+)", line)
        if m and fn:
            usage[fn] = (int(m.group(1)), int(m.group(2)))
    return sass, usage


# ================================================================================== triton

def _triton_op(kernel: str, config: str) -> Tuple[str, str]:
    """(op, direction) from a triton kernel name and its constexpr words."""
    words = set(config.split())
    direction = "bwd" if "_bwd" in kernel else "fwd"
    if "token_logprobs" in kernel:
        tok = "HAS_TOKENS=1" in words
        ent = ("WITH_ENTROPY=1" in words) if direction == "fwd" else ("HAS_GH=1" in words)
        glp = direction == "fwd" or "HAS_GLP=1" in words
        if not tok or not glp:
            return "entropy", direction
        return ("token_logprobs+entropy" if ent else "token_logprobs"), direction
    if "_fdiv" in kernel:  # triton/_divergence.py: the f-divergences beyond KL / JSD
        return f"kl_divergence {'alpha' if 'KIND=3' in words else 'tv'}", direction
    if "_kl_" in kernel:
        kind = {"KIND=0": "reverse", "KIND=1": "forward", "KIND=2": "jsd"}
        k = next((v for w, v in kind.items() if w in words), "?")
        return f"kl_divergence {k}", direction
    if "sparse" in kernel:
        mode = next((w.split("=")[1] for w in words if w.startswith("MODE=")), "?")
        name = {"0": "sparse_logprobs full", "1": "sparse_logprobs support",
                "2": "sparse_kl"}.get(mode, "sparse")
        return name, direction
    return kernel.strip("_").replace("_kernel", ""), direction


def triton_cases(dtype: torch.dtype, quick: bool):
    if quick:
        from rlkernels.triton import vocab as K

        def run():
            x, tok = S.gpu(N_ROWS, VOCAB, dtype=dtype), S.gpu(N_ROWS, dtype=torch.int64)
            for ent in (False, True):
                lp, h, st = K.token_logprobs_forward(x, tok, 1.0, -100, ent)
                K.token_logprobs_backward(lp, None, x, tok, st, 1.0, -100)
        return [(f"token_logprobs N={N_ROWS} V={VOCAB} {S._dt(dtype)}", run)]
    return (S.vocab_cases(N_ROWS, VOCAB, dtype)
            + S.sparse_cases(N_ROWS, VOCAB, K_SPARSE, dtype)
            + S.grpo_cases(4, N_ROWS // 4, VOCAB, dtype))


_VOCAB_MODULES = ("rlkernels.triton.vocab", "rlkernels.triton.sparse",
                  "rlkernels.triton._divergence")
_LAUNCHES: List[S.Launch] = []


_PTXAS_ENTRY = re.compile(r"entry function '(\w+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_spills(log: str) -> Dict[str, int]:
    """``{function: spill store + load bytes}`` from a ``ptxas -v`` log."""
    out, fn = {}, None
    for line in log.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            fn = m.group(1)
        m = _PTXAS_SPILL.search(line)
        if m and fn:
            out[fn] = int(m.group(1)) + int(m.group(2))
    return out


def _triton_spills(ptx: str, arch: str = "sm_90a") -> Dict[str, int]:
    """ptxas -v of the kernel's PTX with the flags triton's make_cubin passes (its log is
    not kept, and a cache hit skips ptxas)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        from triton.backends.nvidia.compiler import get_ptxas  # the ptxas triton runs
        proc = subprocess.run([get_ptxas(90).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.o")],
                              capture_output=True, text=True)
    return ptxas_spills(proc.stderr + proc.stdout)


def _triton_one(launch: S.Launch) -> dict:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options=launch.options.__dict__)
    sass, usage = sass_of_cubin(kernel.asm["cubin"])
    return {"sass": sass, "usage": usage, "spills": _triton_spills(kernel.asm["ptx"])}


def _child(index: int, conn) -> None:
    try:
        conn.send(_triton_one(_LAUNCHES[index]))
    except Exception as exc:  # noqa: BLE001 -- reported as the row's error
        conn.send({"error": f"{type(exc).__name__}: {str(exc)[:400]}"})
    conn.close()


def _isolated(index: int) -> dict:
    """Compile in a forked process: an LLVM abort becomes an error row, not the end."""
    ctx = get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(index, send))
    proc.start()
    send.close()
    try:
        out = recv.recv()
    except EOFError:
        out = {"error": f"compiler process died (exit code {proc.exitcode})"}
    proc.join()
    return out


def triton_rows(dtype: torch.dtype, quick: bool, jobs: int, pattern: Optional[str]) -> List[
        Tuple[Row, str]]:
    distinct, errors = S.capture_launches(triton_cases(dtype, quick), 90)
    for err in errors:
        print(f"triton case failed: {err}", file=sys.stderr)
    launches = [la for la in distinct.values() if la.fn.fn.__module__ in _VOCAB_MODULES
                and (not pattern or re.search(pattern, la.kernel + " " + la.config()))]
    _LAUNCHES[:] = launches
    with ThreadPoolExecutor(max(jobs, 1)) as pool:
        outs = list(pool.map(_isolated, range(len(launches))))
    rows = []
    for la, out in zip(launches, outs):
        config = la.config()
        op, direction = _triton_op(la.kernel, config)
        shape = la.case.split(" ", 1)[1] if " " in la.case else la.case
        row = Row("triton", op, direction, la.kernel, config, S._dt(dtype), shape)
        if "error" in out:
            row.error = out["error"]
            rows.append((row, ""))
            continue
        funcs = parse_sass(out["sass"])
        name = next(iter(funcs))
        row.regs, row.stack = out["usage"].get(name, (-1, -1))
        row.spill_b = out["spills"].get(name, -1)
        rows.append((analyze(funcs[name], row), out["sass"]))
    return rows


# ==================================================================================== cuda

_DT_CUDA = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32", "double": "fp64"}


def _template_params(source: str) -> Dict[str, List[str]]:
    """``{kernel: [template parameter names]}`` from the ``template <...>`` in front of each
    ``__global__`` function of a CUDA source."""
    out = {}
    pat = re.compile(r"template\s*<([^>]*)>\s*__global__\s+void\s+"
                     r"(?:__launch_bounds__\((?:[^()]|\([^()]*\))*\)\s*)?(\w+)\s*\(", re.S)
    for m in pat.finditer(source):
        out[m.group(2)] = [p.split()[-1] for p in m.group(1).split(",")]
    return out


def _split_args(text: str) -> List[str]:
    args, depth, cur = [], 0, ""
    for ch in text:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        if ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        args.append(cur.strip())
    return args


def _cuda_op(kernel: str, params: Dict[str, str]) -> Tuple[str, str]:
    direction = "bwd" if "_bwd" in kernel else "fwd"
    flag = {k: v.lower() in ("true", "1") for k, v in params.items()}
    if kernel.startswith("token_logprobs"):
        if direction == "fwd":
            tok = flag.get("kHasTok", True)
            ent = flag.get("kWithEnt", False)
        else:
            tok = flag.get("kHasGlp", True)
            ent = flag.get("kHasGh", False)
        if not tok:
            return "entropy", direction
        return ("token_logprobs+entropy" if ent else "token_logprobs"), direction
    if kernel.startswith("kl_"):
        k = {"0": "reverse", "1": "forward", "2": "jsd", "3": "alpha",
             "4": "tv"}.get(params.get("kKind", ""), "?")
        return f"kl_divergence {k}", direction
    if kernel.startswith("sparse"):
        mode = {"0": "sparse_logprobs full", "1": "sparse_logprobs support",
                "2": "sparse_kl"}.get(params.get("kMode", ""), "sparse")
        return mode, direction
    if kernel.startswith("grpo_gif"):  # csrc/grpo.cu: grpo_loss(grad_in_forward=True)
        return ("grpo_loss gif " + ("scale" if "scale" in kernel else "one-read"),
                "bwd" if "scale" in kernel else "fwd")
    return kernel.replace("_kernel", ""), direction


def cuda_rows(source: Path, dtype: str, pattern: Optional[str],
              rev: Optional[str] = None) -> List[Tuple[Row, str]]:
    """Rows of every ``__global__`` instantiation of ``source`` for ``dtype``; ``rev`` (a git
    revision) compiles the ``csrc/`` of that commit instead of the working tree."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("cuda: nvcc not found, skipped", file=sys.stderr)
        return []
    with tempfile.TemporaryDirectory() as tmp:
        if rev:
            rel = source.resolve().parent.relative_to(ROOT)
            out = Path(tmp) / "src"
            out.mkdir()
            tar = subprocess.run(["git", "archive", rev, str(rel)], cwd=ROOT, check=True,
                                 capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(out)], input=tar, check=True)
            source = out / rel / source.name
        cubin = Path(tmp) / "k.cubin"
        proc = subprocess.run([nvcc, "-std=c++17", "-O3", "-lineinfo", "-arch=sm_90a",
                               "-Xptxas", "-v",
                               "-cubin", f"-I{source.parent}", "-o", str(cubin), str(source)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            err = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return [(Row("cuda", "(all)", "-", source.name, "", dtype, "",
                          error="nvcc failed: " + " | ".join(err)[:400]), "")]
        sass, usage = _sass_of_file(cubin)
        spills = ptxas_spills(proc.stderr + proc.stdout)
        params = _template_params(source.read_text())
    funcs = parse_sass(sass)
    demangled = subprocess.run(["c++filt"], input="\n".join(funcs), capture_output=True,
                               text=True).stdout.splitlines()
    rows = []
    for mangled, pretty in zip(funcs, demangled):
        m = re.search(r"(\w+)<(.*)>\(", pretty)
        if not m:
            continue
        kernel, targs = m.group(1), _split_args(m.group(2))
        names = params.get(kernel, [f"arg{i}" for i in range(len(targs))])
        named = dict(zip(names, targs))
        tdt = _DT_CUDA.get(targs[0], targs[0])
        if tdt != dtype:
            continue
        config = " ".join(f"{k}={v}" for k, v in list(named.items())[1:])
        if pattern and not re.search(pattern, kernel + " " + config):
            continue
        op, direction = _cuda_op(kernel, named)
        row = Row("cuda", op, direction, kernel, config, tdt, "any N, V (one block per row)")
        row.regs, row.stack = usage.get(mangled, (-1, -1))
        row.spill_b = spills.get(mangled, -1)
        text = _function_text(sass, mangled)
        rows.append((analyze(funcs[mangled], row), text))
    return rows


def _function_text(sass: str, name: str) -> str:
    start = sass.find(f"Function : {name}")
    end = sass.find("Function : ", start + 10)
    return sass[start:end if end > 0 else None]


def from_dump(folder: Path, backends: List[str]) -> List[Tuple[Row, str]]:
    """The rows of an earlier ``--dump``, counted again from its SASS files."""
    out = []
    for entry in json.loads((folder / "index.json").read_text()):
        if entry["backend"] not in backends:
            continue
        text = (folder / entry["sass_file"]).read_text()
        keep = {k: entry[k] for k in ("backend", "op", "direction", "kernel", "config",
                                      "dtype", "shape", "regs", "stack", "error")}
        keep["spill_b"] = entry.get("spill_b", -1)
        row = Row(**keep)
        if not row.error:
            funcs = parse_sass(text)
            row = analyze(next(iter(funcs.values())), row)
        out.append((row, text))
    return out


# ================================================================================== output

def table(rows: List[Row]) -> str:
    lines = ["| backend | op | dir | kernel config | regs | spill B | local ops | passes "
             "(loops) | instr/it (layout) | ld+st B/thr/it | BAR | SHFL | MUFU | ratio | mufu "
             "| misaligned |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
             "| --- | --- | --- |"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.backend} | {r.op} | {r.direction} | {r.config} | | | | | | | "
                         f"| | | ERROR {r.error[:120]} | | |")
            continue
        flag = "" if r.ratio <= TARGET else " **>0.5**"
        lines.append(
            f"| {r.backend} | {r.op} | {r.direction} | {r.kernel} {r.config} | {r.regs} | "
            f"{'?' if r.spill_b < 0 else r.spill_b} | {r.local_instr} | {r.passes} "
            f"({r.loops_hot}) | {r.instr} ({r.instr_layout}) | {r.load_b}+{r.store_b} | {r.bar} | "
            f"{r.shfl} | {r.mufu} | {r.ratio:.2f}{flag} | {r.mufu_ratio:.2f} | "
            f"{r.misaligned_ratio:.2f} |")
    return "\n".join(lines)


def summary(rows: List[Row]) -> str:
    """Worst ratio per (op, direction, backend): the table of NOTES.md."""
    worst: Dict[Tuple[str, str], Dict[str, float]] = {}
    for r in rows:
        if r.error:
            continue
        cell = worst.setdefault((r.op, r.direction), {})
        cell[r.backend] = max(cell.get(r.backend, 0.0), r.ratio)
    lines = ["| op | dir | triton | cuda |", "| --- | --- | --- | --- |"]
    for (op, d), cell in sorted(worst.items()):
        fmt = {b: (f"{cell[b]:.2f}" if b in cell else "-") for b in ("triton", "cuda")}
        lines.append(f"| {op} | {d} | {fmt['triton']} | {fmt['cuda']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", nargs="+", default=["triton", "cuda"],
                    choices=["triton", "cuda"])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "fp64"])
    ap.add_argument("--quick", action="store_true",
                    help="triton token_logprobs kernels only (the test)")
    ap.add_argument("--kernel", help="only kernels whose 'name config' matches this regex")
    ap.add_argument("--dump", type=Path, help="write each kernel's SASS and index.json here")
    ap.add_argument("--json", type=Path, help="write the rows as JSON")
    ap.add_argument("--from-dump", type=Path,
                    help="re-count the SASS of an earlier --dump instead of compiling")
    ap.add_argument("--cuda-source", type=Path, nargs="+",
                    default=[ROOT / "csrc" / "vocab.cu", ROOT / "csrc" / "sparse.cu",
                             ROOT / "csrc" / "grpo.cu", ROOT / "csrc" / "linear.cu"],
                    help="the .cu files to compile (default: the vocabulary, sparse, "
                         "grpo_loss(grad_in_forward=True) and lm_head d z ones)")
    ap.add_argument("--cuda-rev", help="compile csrc/ as of this git revision (a 'before')")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)

    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
           "fp64": torch.float64}[args.dtype]
    results: List[Tuple[Row, str]] = []
    if args.from_dump:
        results = from_dump(args.from_dump, args.backend)
        args.backend = []
    if "triton" in args.backend:
        results += triton_rows(tdt, args.quick, args.jobs, args.kernel)
    if "cuda" in args.backend and not args.quick:
        for source in args.cuda_source:
            if args.cuda_rev is None and not source.exists():
                print(f"cuda: {source} does not exist, skipped", file=sys.stderr)
                continue
            results += cuda_rows(source, args.dtype, args.kernel, args.cuda_rev)
    rows = [r for r, _ in results]
    rows.sort(key=lambda r: (r.op, r.direction, r.backend, r.config))
    if args.dump:
        index = []
        for i, (row, text) in enumerate(results):
            sub = args.dump / row.backend
            sub.mkdir(parents=True, exist_ok=True)
            name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{i:03d}_{row.kernel}_{row.config}")[:150]
            (sub / f"{name}.sass").write_text(text)
            row.sass_file = f"{row.backend}/{name}.sass"
            index.append(asdict(row))
        (args.dump / "index.json").write_text(json.dumps(index, indent=1))
    print(table(rows))
    print()
    print(summary(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
