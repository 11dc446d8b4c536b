"""Textual-inversion embeddings: reading the shared formats, and adding their tokens for one generation.

Formats (safetensors first; ``.pt``/``.bin`` only with ``allow_pickle``, read through
``torch.load(weights_only=True)``):

* A1111: ``emb_params`` (safetensors) or ``string_to_param: {"*": tensor}`` (``.pt``),
  shape ``[vectors, hidden]``;
* diffusers: one key, the placeholder token (``{"<cat-toy>": tensor}``), shape ``[hidden]``
  or ``[vectors, hidden]``.

The embedding's name in prompts is its file name without the suffix, as in A1111.

Using them is a reversible patch (:func:`added_tokens`): each vector becomes a new token of
the tokenizer and a new row of the text encoder's token-embedding table; the prompt's
mentions of the name are rewritten to those tokens just before encoding. On exit the
original embedding module (never modified) is put back and the tokenizer's state is
swapped back, so both are exactly as before.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aipaint.errors import InvalidParameter, ModelLoadError


@dataclass(frozen=True, eq=False)
class Embedding:
    """A loaded embedding: its prompt name, vectors ``[n, hidden]`` and file."""

    name: str
    vectors: torch.Tensor
    path: Path

    @property
    def pattern(self) -> re.Pattern[str]:
        """Where the name occurs in a prompt: case-insensitive, not inside a longer word."""
        return name_pattern(self.name)


def name_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w]){re.escape(name)}(?![\w])", re.IGNORECASE)


def _vectors_from(data: Any, path: Path) -> torch.Tensor:
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path.name} is not an embedding file (it holds no dictionary of tensors)")
    if "clip_g" in data or "clip_l" in data:
        raise ModelLoadError(
            f"{path.name} is an SDXL embedding (clip_l + clip_g); textual inversion supports embeddings for one "
            "text encoder (SD1.x, SD2.x) only"
        )
    if "emb_params" in data:
        tensor = data["emb_params"]
    elif "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ModelLoadError(f"{path.name}: string_to_param must hold exactly one tensor, found {len(params)}")
        tensor = next(iter(params.values()))
    else:
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            raise ModelLoadError(
                f"{path.name} is not an embedding this version reads: expected emb_params, string_to_param or a "
                f"single token key, found {', '.join(sorted(map(str, data))[:8])}"
            )
        tensor = next(iter(tensors.values()))
    if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (1, 2) or tensor.numel() == 0:
        raise ModelLoadError(f"{path.name}: the embedding must be a [hidden] or [vectors, hidden] tensor")
    return tensor.detach().reshape(-1, tensor.shape[-1]).float().clone()


def read_embedding(path: Path, name: str, *, allow_pickle: bool = False) -> Embedding:
    from aipaint.models.weights import load_state_dict

    if path.suffix.lower() == ".safetensors":
        data: Any = load_state_dict(path)
    else:
        data = load_state_dict(path, allow_pickle=allow_pickle)
    return Embedding(name, _vectors_from(data, path), path)


def _swap_state(target: Any, state: dict[str, Any]) -> None:
    """Give ``target`` another instance's state: the same object (held by prompt encoders) changes behaviour."""
    target.__dict__.clear()
    target.__dict__.update(state)


@contextmanager
def added_tokens(tokenizer: Any, text_encoder: nn.Module, embeddings: Sequence[Embedding]) -> Iterator[dict[str, str]]:
    """Add the embeddings' vectors as tokens for the duration of the block.

    Yields ``{name: replacement text}``: the added tokens that spell each embedding in a
    prompt. The tokenizer object and the text encoder keep their identity (prompt encoders
    hold them), and are restored exactly on exit.
    """
    table = text_encoder.get_input_embeddings()
    hidden = table.weight.shape[1]
    for embedding in embeddings:
        if embedding.vectors.shape[1] != hidden:
            raise InvalidParameter(
                "embedding", embedding.name, f"has vectors of size {embedding.vectors.shape[1]}, but this model's text "
                f"encoder uses {hidden}", "it was made for another model family",
            )
    spellings = {e.name: [f"<ti_{i}_{k}>" for k in range(e.vectors.shape[0])] for i, e in enumerate(embeddings)}
    new_tokens = [t for tokens in spellings.values() for t in tokens]

    patched = copy.deepcopy(tokenizer)
    if patched.add_tokens(new_tokens) != len(new_tokens):
        raise RuntimeError("the tokenizer already knows some textual-inversion placeholder tokens")
    ids = patched.convert_tokens_to_ids(new_tokens)
    rows = max(table.num_embeddings, max(ids) + 1)
    bigger = nn.Embedding(rows, hidden, device=table.weight.device, dtype=table.weight.dtype)
    bigger.requires_grad_(table.weight.requires_grad)
    with torch.no_grad():
        bigger.weight[: table.num_embeddings] = table.weight
        for embedding in embeddings:
            token_ids = patched.convert_tokens_to_ids(spellings[embedding.name])
            bigger.weight[token_ids] = embedding.vectors.to(table.weight.device, table.weight.dtype)

    original_state = tokenizer.__dict__.copy()
    config = getattr(text_encoder, "config", None)
    original_vocab = getattr(config, "vocab_size", None)
    _swap_state(tokenizer, patched.__dict__)
    text_encoder.set_input_embeddings(bigger)
    if config is not None:
        config.vocab_size = rows
    try:
        yield {name: " ".join(tokens) for name, tokens in spellings.items()}
    finally:
        text_encoder.set_input_embeddings(table)
        if config is not None:
            config.vocab_size = original_vocab
        _swap_state(tokenizer, original_state)
