"""Per-token log-probs from a Hugging Face causal LM without materializing its logits.

``patch_model(model)`` wraps ``model.forward``: called with ``labels=...`` and
``return_logprobs=True`` it runs the backbone (``model.base_model``, e.g. ``model.model``),
takes the last hidden states, shifts them (``hidden[:, :-1]`` predicts ``labels[:, 1:]``) and
calls :func:`rlkernels.linear_token_logprobs` with the LM head's weight and bias. It returns a
:class:`LogprobsOutput` with ``logprobs [B, T-1]`` fp32 (0 where the shifted label is -100),
``entropy`` (with ``return_entropy=True``; also 0 at -100 labels), ``loss`` (mean negative log-likelihood over the
non-ignored labels, the model's own loss at ``temperature=1``) and ``logits=None``. Without
``return_logprobs=True`` the original forward runs unchanged (generation is untouched).
``unpatch_model(model)`` restores the original forward.

Models whose logits are not ``hidden @ W^T + b`` (final logit soft-capping, logit scaling)
are refused by ``patch_model`` with a ``ValueError`` rather than given wrong numbers.
"""

import types
from dataclasses import dataclass
from typing import Optional

import torch

import rlkernels

__all__ = ["patch_model", "unpatch_model", "LogprobsOutput"]

_ATTR = "_rlkernels_original_forward"


def _output_class():
    from transformers.utils import ModelOutput

    @dataclass
    class LogprobsOutput(ModelOutput):
        loss: Optional[torch.Tensor] = None
        logprobs: Optional[torch.Tensor] = None
        entropy: Optional[torch.Tensor] = None
        logits: Optional[torch.Tensor] = None
    return LogprobsOutput


LogprobsOutput = None
try:  # defined when transformers is importable; patch_model needs it anyway
    LogprobsOutput = _output_class()
except ImportError:  # pragma: no cover
    pass


def _check_plain_head(model):
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier",
                 "lm_head_multiplier", "logits_scaling"):
        value = getattr(cfg, name, None)
        if value is not None and not (name != "final_logit_softcapping" and value == 1.0):
            raise ValueError(f"patch_model: model config has {name}={value!r}; rlkernels computes "
                             "logits as hidden @ lm_head.weight^T + bias only")
    if model.get_output_embeddings() is None:
        raise ValueError("patch_model: model has no output embeddings (lm_head)")


def patch_model(model):
    """Make ``model(input_ids, labels=labels, return_logprobs=True[, return_entropy=True,
    temperature=T])`` return per-token log-probs of the shifted labels. Idempotent; returns
    ``model``."""
    if getattr(model, _ATTR, None) is not None:
        return model
    _check_plain_head(model)
    original_forward = model.forward

    def forward(self, *args, labels=None, return_logprobs=False, return_entropy=False,
                temperature=1.0, **kwargs):
        if not return_logprobs:
            if labels is not None:
                kwargs["labels"] = labels
            return original_forward(*args, **kwargs)
        if labels is None:
            raise ValueError("return_logprobs=True needs labels (the token ids to score; "
                             "-100 marks positions to skip)")
        kwargs["use_cache"] = False
        out = self.base_model(*args, **kwargs)
        hidden = out.last_hidden_state[:, :-1]
        labels = labels[:, 1:].to(hidden.device)
        head = self.get_output_embeddings()
        res = rlkernels.linear_token_logprobs(hidden, head.weight, labels, bias=head.bias,
                                              temperature=temperature,
                                              return_entropy=return_entropy)
        logp, ent = res if return_entropy else (res, None)
        valid = labels != -100
        loss = -logp.sum() / valid.sum().clamp(min=1)
        return LogprobsOutput(loss=loss, logprobs=logp, entropy=ent, logits=None)

    model.forward = types.MethodType(forward, model)
    setattr(model, _ATTR, original_forward)
    return model


def unpatch_model(model):
    """Restore the forward ``patch_model`` replaced. A no-op on an unpatched model."""
    original = getattr(model, _ATTR, None)
    if original is None:
        return model
    if "forward" in vars(model) and getattr(original, "__self__", None) is model \
            and original.__func__ is type(model).forward:
        del model.forward  # the class's own forward again, as before patching
    else:
        model.forward = original
    delattr(model, _ATTR)
    return model
