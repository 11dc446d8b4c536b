"""T5 prompt encoding with the A1111 prompt syntax, for families whose text encoder is T5 (SD 3, FLUX).

A T5 encoder reads one sequence of up to ``max_length`` tokens (no 75-token chunks, no BOS,
one EOS). Emphasis works as the CLIP encoders' does: each token's output vector is multiplied by
its weight (``(word:1.3)``, ``[word]``), then, with ``normalization="a1111"``, the sequence is
rescaled to its unweighted mean. ``BREAK`` is only a separator here. Text without emphasis
encodes exactly as diffusers' pipelines encode it (padded to ``max_length``, truncated past it).

torch is imported when something is encoded, not when this module is.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from aipaint.models.devices import execution_device
from aipaint.prompt.parser import WeightedText, parse_attention

if TYPE_CHECKING:
    import torch

__all__ = ["T5PromptEncoder", "t5_pieces"]

_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def t5_pieces(text: str) -> list[WeightedText]:
    """The prompt's weighted pieces, ``BREAK`` turned into a space (T5 has no chunks to break)."""
    pieces = [WeightedText(_BREAK.sub(" ", p.text), p.weight) for p in parse_attention(text)]
    return [p for p in pieces if p.text]


class T5PromptEncoder:
    """Encodes prompts with a transformers T5 encoder and its tokenizer, weights applied per token."""

    def __init__(self, tokenizer: Any, encoder: Any, *, max_length: int = 256, normalization: str = "a1111") -> None:
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.max_length = int(max_length)
        self.normalization = normalization

    def tokens(self, text: str) -> tuple[list[int], list[float]]:
        """The token ids (EOS last, padded to ``max_length``) and each token's weight."""
        pieces = t5_pieces(text)
        ids: list[int] = []
        weights: list[float] = []
        if pieces:
            per_piece = self.tokenizer([p.text for p in pieces], add_special_tokens=False)["input_ids"]
            for piece, piece_ids in zip(pieces, per_piece, strict=True):
                ids.extend(piece_ids)
                weights.extend([piece.weight] * len(piece_ids))
        room = self.max_length - 1
        ids, weights = ids[:room], weights[:room]
        ids.append(self.tokenizer.eos_token_id)
        weights.append(1.0)
        pad = self.max_length - len(ids)
        return ids + [self.tokenizer.pad_token_id] * pad, weights + [1.0] * pad

    def count_tokens(self, text: str) -> int:
        """How many of the text's tokens the encoder reads (without the EOS), at most ``max_length - 1``."""
        ids, _ = self.tokens(text)
        return sum(1 for i in ids if i not in (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id))

    def plain_ids(self, text: str) -> list[int]:
        """The ids diffusers' pipelines use for ``text`` (one tokenizer call on the whole text)."""
        out = self.tokenizer(text, padding="max_length", max_length=self.max_length, truncation=True, add_special_tokens=True)
        return list(out["input_ids"])

    def encode(self, text: str) -> torch.Tensor:
        """``[1, max_length, d_model]`` hidden states, emphasis applied."""
        import torch

        pieces = t5_pieces(text)
        weights: list[float] | None = None
        if any(p.weight != 1.0 for p in pieces):
            ids, weights = self.tokens(text)
        else:
            # Without emphasis, tokenize the text in one call, exactly as diffusers does; pieces
            # tokenised one by one can differ at their joins (SentencePiece's word-start marks).
            ids = self.plain_ids("".join(p.text for p in pieces))
        device = execution_device(self.encoder)  # not the weights': they may be offloaded
        with torch.inference_mode():
            z = self.encoder(torch.tensor([ids], device=device), output_hidden_states=False)[0]
        if weights is None:
            return z
        multipliers = torch.tensor(weights, dtype=z.dtype, device=z.device).reshape(1, -1, 1)
        out = z * multipliers
        if self.normalization == "a1111":
            before, after = z.double().mean(), out.double().mean()
            scale = z.double().abs().mean()
            if abs(after) > 1e-4 * scale and abs(before) > 1e-4 * scale:
                out = out * (before / after).to(z.dtype)
        return out
