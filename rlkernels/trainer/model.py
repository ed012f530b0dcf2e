"""The policy model: a tiny randomly-initialized Hugging Face causal LM, or ``--model PATH``.

The tiny model is a Qwen2 (or Llama) architecture built from a ``transformers`` config sized
for the character tokenizer, small enough to learn the built-in tasks on a CPU in minutes.
Attention is ``flash_attention_2`` when flash-attn is installed and the model is on a GPU,
``sdpa`` otherwise.
"""

from __future__ import annotations

import importlib.util
from typing import Optional, Tuple

import torch

__all__ = ["attention_implementation", "build_tiny_model", "load_model", "completion_hidden",
           "completion_logits"]

Tensor = torch.Tensor


def attention_implementation(device: torch.device) -> str:
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


#: ``--size`` presets of the random model: ``tiny`` learns the tasks on a CPU in minutes;
#: ``qwen2.5-0.5b`` has the shape of Qwen2.5-0.5B (its 151936-token vocabulary included: the
#: character ids come first, the other ids decode as "\ufffd") to measure memory and step time.
SIZES = {
    "tiny": dict(hidden_size=None, layers=None, heads=4, kv_heads=2, intermediate_size=None,
                 vocab_size=None, tie=False),
    "qwen2.5-0.5b": dict(hidden_size=896, layers=24, heads=14, kv_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie=True),
}


def build_tiny_model(arch: str, vocab_size: int, tokenizer, device: torch.device,
                     hidden_size: int = 64, layers: int = 2,
                     max_positions: int = 128, dtype: torch.dtype = torch.float32,
                     size: str = "tiny"):
    """A random ``arch`` ("qwen2" or "llama") causal LM; the caller seeds the RNG first.
    ``size="tiny"`` uses ``hidden_size``/``layers``; another :data:`SIZES` preset overrides
    them (and ``vocab_size``, which must hold the tokenizer's ids)."""
    import transformers

    if size not in SIZES:
        raise ValueError(f"size: expected one of {sorted(SIZES)}, got {size!r}")
    preset = SIZES[size]
    hidden_size = preset["hidden_size"] or hidden_size
    layers = preset["layers"] or layers
    heads, kv_heads = preset["heads"], preset["kv_heads"]
    intermediate = preset["intermediate_size"] or 2 * hidden_size
    vocab_size = max(vocab_size, preset["vocab_size"] or 0)

    configs = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}
    if arch not in configs:
        raise ValueError(f"arch: expected one of {sorted(configs)}, got {arch!r}")
    if hidden_size % heads:
        raise ValueError(f"hidden_size: expected a multiple of heads={heads}, got {hidden_size}")
    config = configs[arch](
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=preset["tie"], pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config._attn_implementation = attention_implementation(device)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device)


def load_model(path: str, device: torch.device, dtype: Optional[torch.dtype] = None):
    """``(model, hf_tokenizer)`` from a local Hugging Face folder."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or "auto", attn_implementation=attention_implementation(device))
    return model.to(device), tokenizer


def _positions(attention_mask: Tensor) -> Tensor:
    # Left-padded prompts: position ids count real tokens only, as generate() does.
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def completion_logits(model, input_ids: Tensor, attention_mask: Tensor, n_completion: int
                      ) -> Tensor:
    """Logits ``[B, C, V]`` that predict the last ``C = n_completion`` tokens of
    ``input_ids`` (the model computes logits only for those positions)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=_positions(attention_mask), use_cache=False,
                logits_to_keep=n_completion + 1)
    return out.logits[:, :-1]


def completion_hidden(model, input_ids: Tensor, attention_mask: Tensor, n_completion: int
                      ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(hidden [B, C, H], lm_head weight [V, H], bias or None)``: the last hidden states
    that predict the last ``n_completion`` tokens, for the ``linear_*`` ops (no logits)."""
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=_positions(attention_mask), use_cache=False)
    head = model.get_output_embeddings()
    hidden = out.last_hidden_state[:, -n_completion - 1:-1]
    return hidden, head.weight, head.bias
