"""The README's Python snippets run as written, in order, in one namespace.

Snippets for an optional library (TRL, transformers: ``pip install -e ".[integrations]"``)
are skipped, and reported, when it is not installed; CI installs it.
"""

import importlib.util
import pathlib
import re
import warnings

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_NEEDS = {"integrations import trl": "trl", "from transformers import": "transformers"}


def test_readme_python_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 9, "the README lost its snippets"
    torch.manual_seed(0)
    namespace: dict = {}
    for i, code in enumerate(blocks):
        missing = [mod for marker, mod in _NEEDS.items()
                   if marker in code and importlib.util.find_spec(mod) is None]
        if missing:
            warnings.warn(f"README block {i} skipped: {', '.join(missing)} not installed")
            continue
        exec(compile(code, f"README.md python block {i}", "exec"), namespace)
    assert torch.isfinite(namespace["loss"]).all()
