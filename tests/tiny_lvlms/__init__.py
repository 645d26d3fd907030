"""Tiny random-weight models of every LVLM family, built offline from transformers' own config classes."""

from __future__ import annotations

from typing import Any

import torch


def suppress_special_tokens(model: torch.nn.Module, tokenizer: Any) -> None:
    """Keep a random model's greedy answers free of special tokens other than its end tokens.

    A random model may emit ``<bos>`` or an image placeholder mid-answer, and which one it emits depends
    on near-ties that differ between machines (AVX2, AVX-512, one or two threads). Decoding drops special
    tokens, so such an answer no longer re-tokenises to itself and the comparisons of teacher forcing with
    generation would pass on one machine and fail on another. Real models do not emit them."""
    config = model.generation_config
    ends = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    special = set(tokenizer.all_special_ids)
    special |= {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    config.suppress_tokens = sorted(special - {end for end in ends if end is not None})
