"""Built-in tasks with verifiable rewards, and the tokenizers they are written in.

Every task draws ``(prompt, answer)`` string pairs from a ``random.Random`` and scores a
completion with the same reward, :func:`char_reward`:

* ``addition``: ``"37+58="`` -> ``"95"`` (operands of ``digits`` digits each);
* ``reversal``: ``"cabd>"`` -> ``"dbac"`` (3 to 5 letters of ``a``-``e``);
* ``counting``: ``"abbab#a="`` -> ``"2"`` (how many ``a`` in 1 to 9 letters of ``a``, ``b``).

The default tokenizer is character level (:class:`CharTokenizer`); with ``--model PATH`` the
model's own Hugging Face tokenizer is wrapped in :class:`HFTokenizer` with the same interface.
"""

from __future__ import annotations

import random
from typing import Callable, Dict, List, Sequence, Tuple

__all__ = ["CharTokenizer", "HFTokenizer", "TASKS", "char_reward", "sample_prompts"]


class CharTokenizer:
    """One id per character of a fixed alphabet, plus ``<pad>`` (0), ``<bos>`` (1) and
    ``<eos>`` (2). ``encode`` prepends ``<bos>``. ``decode`` writes any other id, special ones
    included, as ``"\ufffd"``: a completion that emits ``<pad>`` must not read as a shorter
    (and better-rewarded) answer."""

    ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz+-=#>:? "

    def __init__(self):
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self._ids = {c: i + 3 for i, c in enumerate(self.ALPHABET)}
        self._chars = {i: c for c, i in self._ids.items()}
        self.vocab_size = 3 + len(self.ALPHABET)

    def encode(self, text: str) -> List[int]:
        unknown = sorted(set(text) - set(self._ids))
        if unknown:
            raise ValueError(f"CharTokenizer: characters {unknown} are not in the alphabet "
                             f"{self.ALPHABET!r}")
        return [self.bos_token_id] + [self._ids[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._chars.get(int(i), "\ufffd") for i in ids)


class HFTokenizer:
    """A Hugging Face tokenizer behind the :class:`CharTokenizer` interface (for ``--model``)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError("--model: the tokenizer has no eos_token_id; generation could "
                             "not stop")
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> List[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        return ([self.bos_token_id] if self.bos_token_id is not None else []) + ids

    def decode(self, ids: Sequence[int]) -> str:
        # special tokens stay visible: they must not shorten a completion for the reward
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _addition(rng: random.Random, digits: int) -> Tuple[str, str]:
    hi = 10 ** digits - 1
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    return f"{a}+{b}=", str(a + b)


def _reversal(rng: random.Random, digits: int) -> Tuple[str, str]:
    s = "".join(rng.choice("abcde") for _ in range(rng.randint(3, 5)))
    return f"{s}>", s[::-1]


def _counting(rng: random.Random, digits: int) -> Tuple[str, str]:
    s = "".join(rng.choice("ab") for _ in range(rng.randint(1, 9)))
    return f"{s}#a=", str(s.count("a"))


TASKS: Dict[str, Callable[[random.Random, int], Tuple[str, str]]] = {
    "addition": _addition, "reversal": _reversal, "counting": _counting}


def sample_prompts(task: str, n: int, rng: random.Random, digits: int = 1
                   ) -> List[Tuple[str, str]]:
    """``n`` ``(prompt, answer)`` pairs of ``task``."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {task!r}")
    return [TASKS[task](rng, digits) for _ in range(n)]


def char_reward(completion: str, answer: str) -> float:
    """Per-position accuracy: ``#{i : completion[i] == answer[i]} / max(len(completion),
    len(answer))``, in ``[0, 1]``; 1 only for the exact answer. ``completion`` is the text
    before ``<eos>``: a completion that never stops is as long as the generation budget,
    and is penalized for every extra character. The partial credit gives a tiny
    randomly-initialized model a signal to climb before it gets whole answers right."""
    longest = max(len(completion), len(answer), 1)
    return sum(a == b for a, b in zip(completion, answer)) / longest
