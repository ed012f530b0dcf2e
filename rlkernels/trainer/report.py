"""Outputs of a training run: a progress line, a JSONL metrics log, a PNG learning curve."""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Dict, List, Optional

import torch

__all__ = ["peak_memory_gb", "Progress", "MetricsLog", "plot_curve"]


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset (CUDA), else the process's peak
    resident memory (``ru_maxrss``, which never goes down)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Progress:
    """A tqdm bar when tqdm is installed and stderr is a terminal, else one line per step."""

    def __init__(self, total: int, enabled: bool = True):
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc="train", dynamic_ncols=True)
            except ImportError:
                pass
        self.total = total

    def update(self, step: int, record: Dict[str, float]) -> None:
        if not self.enabled:
            return
        keys = [k for k in ("reward", "loss", "kl", "entropy", "clipfrac", "diff_loss",
                            "diff_logp", "diff_grad_norm") if k in record]
        text = " ".join(f"{k}={record[k]:.4g}" for k in keys)
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        else:
            print(f"step {step + 1}/{self.total} {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLog:
    """Appends one JSON object per step to ``path`` (the folder is created)."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.records: List[Dict] = []
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            open(path, "w").close()

    def write(self, record: Dict) -> None:
        self.records.append(record)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def plot_curve(records: List[Dict], path: str, title: str) -> Optional[str]:
    """Mean reward (and its moving average) per step; ``None`` when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r["step"] for r in records]
    reward = [r["reward"] for r in records]
    window = max(1, len(reward) // 20)
    smooth = [sum(reward[max(0, i - window + 1):i + 1]) / len(reward[max(0, i - window + 1):i + 1])
              for i in range(len(reward))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, reward, alpha=0.35, label="mean reward")
    ax.plot(steps, smooth, label=f"moving average ({window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
