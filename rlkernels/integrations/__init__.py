"""Drop-in use of rlkernels from the trainers people already run.

* :mod:`rlkernels.integrations.trl`: ``patch()`` / ``unpatch()`` swap TRL's log-prob and entropy
  helpers (and the fused LM head of its GRPO trainer) for rlkernels ops.
* :mod:`rlkernels.integrations.verl`: verl's functions (same signatures and semantics) on top of
  rlkernels ops, and ``patch()`` / ``unpatch()`` when verl is importable.
* :mod:`rlkernels.integrations.transformers`: ``patch_model(model)`` makes a causal LM return
  per-token log-probs from its hidden states without materializing the logits.

The submodules import their library lazily (inside ``patch()``), so importing them is cheap and
never fails because TRL / verl / transformers is missing.
"""

import sys
from typing import Callable, Dict, List, Tuple

__all__ = ["trl", "verl", "transformers"]


class _ModulePatcher:
    """Replace every module attribute (in ``sys.modules`` entries under ``prefix``) that *is* a
    given original object, remember each replacement, and put the originals back exactly.

    Identity (``is``) is the test, so a module that did ``from .utils import f`` is patched too,
    and nothing else (an unrelated function of the same name) is touched. ``unpatch`` also
    restores modules imported *after* ``patch`` (they copied the replacement): it scans for the
    replacement objects again.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.originals: Dict[str, object] = {}     # name -> original object
        self.replacements: Dict[str, object] = {}  # name -> replacement object
        self.done: List[Tuple[object, str, object]] = []  # (module or dict, key, original)

    @property
    def active(self) -> bool:
        return bool(self.replacements)

    def _modules(self):
        return [m for n, m in list(sys.modules.items())
                if m is not None and (n == self.prefix or n.startswith(self.prefix + "."))]

    def patch(self, pairs: Dict[str, Tuple[object, object]],
              containers: Callable[[], list] = lambda: []) -> None:
        """``pairs``: name -> (original, replacement). ``containers``: extra dicts (registries)
        whose values may hold the originals."""
        if self.active:
            return
        by_id = {id(orig): (name, orig, repl) for name, (orig, repl) in pairs.items()}
        for name, (orig, repl) in pairs.items():
            self.originals[name] = orig
            self.replacements[name] = repl
        for mod in self._modules():
            for key, value in list(vars(mod).items()):
                hit = by_id.get(id(value))
                if hit is not None and hit[1] is value:
                    setattr(mod, key, hit[2])
                    self.done.append((mod, key, value))
        for d in containers():
            for key, value in list(d.items()):
                hit = by_id.get(id(value))
                if hit is not None and hit[1] is value:
                    d[key] = hit[2]
                    self.done.append((d, key, value))

    def unpatch(self, containers: Callable[[], list] = lambda: []) -> None:
        if not self.active:
            return
        for target, key, orig in reversed(self.done):
            if isinstance(target, dict):
                target[key] = orig
            else:
                setattr(target, key, orig)
        # modules imported after patch() copied a replacement: give them the original too
        by_id = {id(r): (r, self.originals[n]) for n, r in self.replacements.items()}
        for mod in self._modules():
            for key, value in list(vars(mod).items()):
                hit = by_id.get(id(value))
                if hit is not None and hit[0] is value:
                    setattr(mod, key, hit[1])
        for d in containers():
            for key, value in list(d.items()):
                hit = by_id.get(id(value))
                if hit is not None and hit[0] is value:
                    d[key] = hit[1]
        self.originals.clear()
        self.replacements.clear()
        self.done.clear()
