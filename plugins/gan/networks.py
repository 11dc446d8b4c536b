"""The two networks of the GAN and how a caption becomes their condition.

* :class:`Generator` — DCGAN's generator (Radford et al., 2016) at 32×32: a linear layer to a
  4×4 feature map, three stride-2 transposed convolutions with batch norm and ReLU, ``tanh``.
* :class:`Critic` — a Wasserstein critic (Arjovsky et al., 2017): DCGAN's discriminator without
  batch norm (the gradient penalty is defined per sample, and batch norm would mix samples) and
  without the final sigmoid (it scores, it does not classify).
* The condition (:class:`Vocabulary`): the caption as a bag of words, a multi-hot vector over the
  words of the training captions. The generator takes the sum of the words' embeddings next to
  its noise; the critic scores with a projection (Miyato & Koyama, 2018): ``w·φ(x) + e(c)·φ(x)``.
  A bag of words carries colour, shape, size, position and background words, but not which word
  belongs to which object: a GAN conditioned like this cannot bind attributes in a two-object
  caption, and the docs say so.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

IMAGE_SIZE = 32
#: Words that name nothing in a picture; they are never part of a vocabulary.
STOP_WORDS = frozenset({"a", "an", "the", "on", "at", "in", "and", "of", "with", "to", "near", "side", "edge"})
_WORD = re.compile(r"[a-z]+")


def caption_words(text: str) -> list[str]:
    """The lower-case words of ``text`` that could carry meaning (digits, punctuation, stop words left out)."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS]


@dataclass(frozen=True)
class Vocabulary:
    """The words a conditioned GAN knows, in a fixed order (the multi-hot vector's positions)."""

    words: tuple[str, ...]

    @classmethod
    def from_captions(cls, captions: Iterable[str], min_count: int = 1) -> Vocabulary:
        counts: dict[str, int] = {}
        for text in captions:
            for word in set(caption_words(text)):
                counts[word] = counts.get(word, 0) + 1
        return cls(tuple(sorted(w for w, n in counts.items() if n >= min_count)))

    def __len__(self) -> int:
        return len(self.words)

    def split(self, text: str) -> tuple[list[str], list[str]]:
        """``(known, unknown)`` words of ``text``."""
        known_set = set(self.words)
        words = caption_words(text)
        return [w for w in words if w in known_set], [w for w in words if w not in known_set]

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Multi-hot rows, one per text (float32, shape ``(len(texts), len(self))``)."""
        index = {w: i for i, w in enumerate(self.words)}
        out = torch.zeros(len(texts), len(self.words))
        for row, text in enumerate(texts):
            for word in caption_words(text):
                if word in index:
                    out[row, index[word]] = 1.0
        return out


class Generator(nn.Module):
    """Noise (and a condition) to a 32×32 RGB image in [-1, 1]."""

    def __init__(self, z_dim: int = 64, channels: int = 32, vocab_size: int = 0, embed_dim: int = 32) -> None:
        super().__init__()
        self.z_dim, self.channels, self.vocab_size = z_dim, channels, vocab_size
        self.embed = nn.Linear(vocab_size, embed_dim, bias=False) if vocab_size else None
        width = channels * 4
        self.project = nn.Sequential(
            nn.Linear(z_dim + (embed_dim if vocab_size else 0), width * 4 * 4),
            nn.BatchNorm1d(width * 4 * 4),
            nn.ReLU(inplace=True),
        )
        self.body = nn.Sequential(
            _up(width, channels * 2), _up(channels * 2, channels),
            nn.ConvTranspose2d(channels, 3, 4, stride=2, padding=1), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            if condition is None:
                raise ValueError("this generator is conditioned: pass a condition")
            z = torch.cat([z, self.embed(condition)], dim=1)
        h = self.project(z).view(z.shape[0], self.channels * 4, 4, 4)
        return self.body(h)


class Critic(nn.Module):
    """A 32×32 image (and a condition) to one unbounded score: higher means "more like the data"."""

    def __init__(self, channels: int = 32, vocab_size: int = 0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(channels, channels * 2, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(channels * 2, channels * 4, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),
            nn.Flatten(),
        )
        size = channels * 4 * 4 * 4
        self.score = nn.Linear(size, 1)
        self.embed = nn.Linear(vocab_size, size, bias=False) if vocab_size else None

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(x)
        out = self.score(h).squeeze(1)
        if self.embed is not None:
            if condition is None:
                raise ValueError("this critic is conditioned: pass a condition")
            out = out + (self.embed(condition) * h).sum(dim=1)
        return out


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def init_weights(module: nn.Module) -> None:
    """DCGAN's initialisation: N(0, 0.02) for convolutions and linear layers, N(1, 0.02) for batch-norm scales."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
