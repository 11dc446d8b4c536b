"""Tokenising into 75-token chunks and encoding with a CLIP text encoder, as A1111 does.

* A prompt longer than 75 tokens becomes several chunks, each wrapped in BOS … EOS and
  padded to 77 tokens; the encoder runs per chunk and the outputs are concatenated along
  the sequence axis (``[1, 77 * k, hidden]``). ``BREAK`` starts a new chunk. When a chunk
  fills up and a comma lies within its last 20 tokens, the text after that comma moves to
  the next chunk.
* Emphasis multiplies the encoder's output vectors by each token's weight; then, with
  ``normalization="a1111"``, the chunk is rescaled so its mean is what it was before
  weighting (A1111's "Original" emphasis). ``"none"`` skips the rescale. A chunk whose
  mean is within rounding noise of zero (below ``MEAN_NOISE_FLOOR`` × its mean absolute
  value) is not rescaled: the ratio of two such means carries no information.
* ``clip_skip`` counts as in A1111: 1 is the last layer, 2 the penultimate hidden state
  passed through the final layer norm, and so on. (diffusers' ``clip_skip=1`` is A1111's 2.)

torch is imported only when something is encoded, so ``import aipaint.prompt`` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from aipaint.errors import InvalidParameter
from aipaint.prompt.parser import parse_attention_segments

if TYPE_CHECKING:
    import torch

__all__ = ["NORMALIZATIONS", "Chunk", "PromptEncoder", "Tokenizer", "tokenize_chunks"]

NORMALIZATIONS = ("a1111", "none")
#: Relative size below which a chunk's mean counts as rounding noise (see the module docstring).
MEAN_NOISE_FLOOR = 1e-4
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack"


class Tokenizer(Protocol):
    """What is needed of a tokenizer: a transformers CLIP tokenizer fits."""

    bos_token_id: int
    eos_token_id: int
    pad_token_id: int | None

    def __call__(self, text: list[str], **kwargs: Any) -> Any: ...

    def convert_tokens_to_ids(self, token: str) -> int: ...


@dataclass
class Chunk:
    """One encoder call's worth of prompt: ``chunk_length + 2`` token ids and their weights.

    ``length`` is how many prompt tokens it holds (the rest is BOS, EOS and padding).
    """

    tokens: list[int]
    weights: list[float]
    length: int


def _special_ids(tokenizer: Any) -> tuple[int, int, int, int | None]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    if comma is None or comma == getattr(tokenizer, "unk_token_id", None):
        comma = None
    return bos, eos, pad, comma


def _empty_chunk(tokenizer: Any, chunk_length: int) -> Chunk:
    bos, eos, pad, _ = _special_ids(tokenizer)
    return Chunk([bos, eos] + [pad] * chunk_length, [1.0] * (chunk_length + 2), 0)


def tokenize_chunks(
    tokenizer: Tokenizer | Any, text: str, chunk_length: int = 75, *, comma_backtrack: int = COMMA_BACKTRACK
) -> list[Chunk]:
    """Split one resolved prompt text (emphasis and ``BREAK`` allowed) into weighted chunks.

    Follows A1111's ``tokenize_line``. Always returns at least one chunk.
    """
    bos, eos, pad, comma = _special_ids(tokenizer)
    segments = parse_attention_segments(text)
    pieces = [piece for segment in segments for piece in segment]
    ids = (
        tokenizer([p.text for p in pieces], add_special_tokens=False, truncation=False, verbose=False)[
            "input_ids"
        ]
        if pieces
        else []
    )
    piece_ids = iter(ids)

    chunks: list[Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close_chunk() -> None:
        nonlocal tokens, weights, last_comma
        padding = chunk_length - len(tokens)
        chunks.append(
            Chunk([bos, *tokens, eos] + [pad] * padding, [1.0, *weights, 1.0] + [1.0] * padding, len(tokens))
        )
        tokens, weights, last_comma = [], [], -1

    for index, segment in enumerate(segments):
        if index:
            close_chunk()
        for piece in segment:
            for token in next(piece_ids):
                if comma is not None and token == comma:
                    last_comma = len(tokens)
                elif (
                    comma_backtrack
                    and len(tokens) == chunk_length
                    and last_comma != -1
                    and len(tokens) - last_comma <= comma_backtrack
                ):
                    split = last_comma + 1
                    moved_tokens, moved_weights = tokens[split:], weights[split:]
                    tokens, weights = tokens[:split], weights[:split]
                    close_chunk()
                    tokens, weights = moved_tokens, moved_weights
                if len(tokens) == chunk_length:
                    close_chunk()
                tokens.append(token)
                weights.append(piece.weight)
    if tokens or not chunks:
        close_chunk()
    return chunks


class PromptEncoder:
    """Encodes resolved prompt texts (one step's text of one sub-prompt) into embeddings.

    ``tokenizer`` is a CLIP tokenizer and ``text_encoder`` a transformers CLIP text model
    (``CLIPTextModel`` or ``CLIPTextModelWithProjection``). Gradients follow the caller's
    context: wrap calls in ``torch.inference_mode()`` for generation.

    ``layer_offset`` and ``final_layer_norm`` choose the layer a family reads natively:
    SD1.x reads the last layer (0, True); SDXL reads the penultimate hidden state without
    the final layer norm (1, False). ``clip_skip`` then skips further layers from there.
    """

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Any,
        *,
        clip_skip: int = 1,
        normalization: str = "a1111",
        layer_offset: int = 0,
        final_layer_norm: bool = True,
    ) -> None:
        if normalization not in NORMALIZATIONS:
            raise InvalidParameter(
                "normalization",
                normalization,
                "one of " + ", ".join(repr(n) for n in NORMALIZATIONS),
                "'a1111' restores the mean after weighting; 'none' only multiplies",
            )
        layers = getattr(getattr(text_encoder, "config", None), "num_hidden_layers", None)
        # Families that read an earlier layer natively (SDXL: the penultimate one, without the final
        # layer norm) pass layer_offset / final_layer_norm; clip_skip still counts from there.
        if isinstance(layer_offset, bool) or not isinstance(layer_offset, int) or layer_offset < 0:
            raise InvalidParameter("layer_offset", layer_offset, "a whole number of at least 0")
        deepest = layers - layer_offset if layers else None
        if (
            isinstance(clip_skip, bool)
            or not isinstance(clip_skip, int)
            or clip_skip < 1
            or (deepest and clip_skip > deepest)
        ):
            allowed = f"a whole number from 1 to {deepest}" if deepest else "a whole number of at least 1"
            raise InvalidParameter(
                "clip_skip",
                clip_skip,
                allowed,
                "1 uses the last layer, 2 the one before it (A1111 numbering)",
            )
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.clip_skip = clip_skip
        self.normalization = normalization
        self.layer_offset = layer_offset
        self.final_layer_norm = final_layer_norm
        self.chunk_length = 75

    def chunks(self, text: str) -> list[Chunk]:
        return tokenize_chunks(self.tokenizer, text, self.chunk_length)

    def count_tokens(self, text: str) -> list[int]:
        """Prompt tokens used in each chunk (A1111's "x/75" counter, per chunk)."""
        return [chunk.length for chunk in self.chunks(text)]

    def encode(self, text: str, min_chunks: int = 1) -> torch.Tensor:
        """``[1, 77 * k, hidden]`` for one resolved text, ``k >= min_chunks`` (padded with empty chunks)."""
        return self._encode_chunks(self._padded(self.chunks(text), min_chunks))[0]

    def encode_with_pooled(self, text: str, min_chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`encode`, plus the pooled output of the first chunk (what SDXL conditions on, as in A1111)."""
        return self._encode_chunks(self._padded(self.chunks(text), min_chunks))

    def encode_pair(self, text: str, negative: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Positive and negative embeddings of the same length: the shorter one gets empty chunks."""
        positive, negative_chunks = self.chunks(text), self.chunks(negative)
        count = max(len(positive), len(negative_chunks))
        return (
            self._encode_chunks(self._padded(positive, count))[0],
            self._encode_chunks(self._padded(negative_chunks, count))[0],
        )

    def _padded(self, chunks: list[Chunk], count: int) -> list[Chunk]:
        missing = max(0, count - len(chunks))
        return chunks + [_empty_chunk(self.tokenizer, self.chunk_length) for _ in range(missing)]

    def _device(self) -> Any:
        from aipaint.models.devices import execution_device

        return execution_device(self.text_encoder)

    def _final_layer_norm(self) -> Any:
        # transformers 5's CLIPTextModel holds it directly; CLIPTextModelWithProjection (and
        # transformers 4's CLIPTextModel) under .text_model. diffusers 0.42 only knows the latter.
        norm = getattr(self.text_encoder, "final_layer_norm", None)
        return norm if norm is not None else self.text_encoder.text_model.final_layer_norm

    def _encode_chunks(self, chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        outputs, pooled = [], None
        for chunk in chunks:
            ids = torch.tensor([chunk.tokens], dtype=torch.long, device=self._device())
            depth = self.clip_skip + self.layer_offset  # 1 = the last layer
            plain_last = depth == 1 and self.final_layer_norm
            out = self.text_encoder(ids, output_hidden_states=not plain_last)
            if plain_last:
                z = out.last_hidden_state
            else:
                z = out.hidden_states[-depth]
                if self.final_layer_norm:
                    z = self._final_layer_norm()(z)
            if pooled is None:
                pooled = (
                    out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
                )
            outputs.append(self._weighted(z, chunk.weights))
        return torch.cat(outputs, dim=1), pooled

    def _weighted(self, z: torch.Tensor, weights: list[float]) -> torch.Tensor:
        import torch

        if all(w == 1.0 for w in weights):
            return z
        multipliers = torch.tensor(weights, dtype=z.dtype, device=z.device).reshape(1, -1, 1)
        weighted = z * multipliers
        if self.normalization == "a1111":
            original_mean, new_mean = z.double().mean(), weighted.double().mean()
            # A mean that is rounding noise next to the values (a layer norm with zero bias,
            # as in freshly initialised encoders) would turn the rescale into noise too:
            # large, and of either sign. Real CLIP encoders are nowhere near this bound.
            scale = z.double().abs().mean()
            if abs(new_mean) > MEAN_NOISE_FLOOR * scale and abs(original_mean) > MEAN_NOISE_FLOOR * scale:
                weighted = weighted * (original_mean / new_mean).to(z.dtype)
        return weighted
