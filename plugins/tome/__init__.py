"""Token merging for Stable Diffusion (ToMe for SD), opt-in per generation.

Bolya and Hoffman, "Token Merging for Fast Stable Diffusion" (CVPR-W 2023): in the
high-resolution transformer blocks most image tokens have near-duplicates, so before
self-attention a fraction ``ratio`` of the tokens is merged into similar ones
(bipartite soft matching: in every ``stride``×``stride`` cell one token is a
destination, the others are sources; the most similar sources are averaged into their
best destination), attention runs on the smaller set, and the result is copied back
to the merged positions ("unmerge"). Self-attention costs O(tokens²), so merging half
the tokens at 512 px cuts that part by about 4×.

Opt in with ``AdapterUnit("tome", {"ratio": 0.5})``. Options: ``ratio`` (0–0.9),
``max_downsample`` (1: only the full-resolution blocks, as the paper recommends; 2, 4
or 8 reach deeper blocks), ``stride`` (2) and ``random`` (True: the destination within
each cell is drawn from a generator seeded with the request's seed, so images stay
reproducible). Each block's ``attn1.forward`` is wrapped on activation and restored on
exit. Needs the eager torch runtime.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aipaint import hookimpl
from aipaint.errors import InvalidParameter
from aipaint.plugin.adapters import AdapterActivation, AdapterSpec, AdapterUnit
from aipaint.plugin.kit.patches import AttributePatches, check_patchable_unet

if TYPE_CHECKING:
    import argparse

    import torch

    from aipaint.plugin.adapters import AdapterContext

OPTIONS = ("ratio", "max_downsample", "stride", "random")
Merge = Callable[["torch.Tensor"], "torch.Tensor"]


@dataclass(frozen=True)
class ToMeSettings:
    ratio: float = 0.5
    max_downsample: int = 1
    stride: int = 2
    random: bool = True

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ToMeSettings:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise InvalidParameter("tome", unknown, f"options are {', '.join(OPTIONS)}")
        ratio = options.get("ratio", cls.ratio)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 0.9:
            raise InvalidParameter("tome ratio", ratio, "a fraction of tokens to merge from 0 to 0.9")
        max_downsample = options.get("max_downsample", cls.max_downsample)
        if max_downsample not in (1, 2, 4, 8):
            raise InvalidParameter("tome max_downsample", max_downsample, "1, 2, 4 or 8 (1: full-resolution blocks only)")
        stride = options.get("stride", cls.stride)
        if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= 8:
            raise InvalidParameter("tome stride", stride, "a whole number from 1 to 8")
        random = options.get("random", cls.random)
        if not isinstance(random, bool):
            raise InvalidParameter("tome random", random, "true or false")
        return cls(float(ratio), max_downsample, stride, random)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def bipartite_soft_matching(
    metric: torch.Tensor, height: int, width: int, stride: int, r: int, generator: torch.Generator | None = None
) -> tuple[Merge, Merge]:
    """Merge ``r`` tokens of ``metric`` ([batch, height*width, channels]) into similar ones.

    Returns ``(merge, unmerge)``: ``merge`` maps [B, N, C] to [B, N - r, C] (merged
    tokens averaged into their destination), ``unmerge`` maps back to [B, N, C] by
    copying each destination's value to the tokens merged into it.
    """
    import torch

    batch, tokens, _ = metric.shape
    cells_h, cells_w = height // stride, width // stride
    if r <= 0 or cells_h == 0 or cells_w == 0:
        return _identity, _identity
    device = metric.device
    with torch.no_grad():
        # One destination per stride×stride cell (random position if a generator is given).
        if generator is not None:
            pick = torch.randint(stride * stride, (cells_h, cells_w, 1), generator=generator).to(device)
        else:
            pick = torch.zeros(cells_h, cells_w, 1, dtype=torch.long, device=device)
        marks = torch.zeros(cells_h, cells_w, stride * stride, dtype=torch.long, device=device)
        marks.scatter_(2, pick, -1)
        marks = marks.view(cells_h, cells_w, stride, stride).transpose(1, 2).reshape(cells_h * stride, cells_w * stride)
        if cells_h * stride < height or cells_w * stride < width:  # edges outside whole cells stay sources
            full = torch.zeros(height, width, dtype=torch.long, device=device)
            full[: cells_h * stride, : cells_w * stride] = marks
            marks = full
        order = marks.reshape(1, -1, 1).argsort(dim=1, stable=True)  # destinations (-1) first
        n_dst = cells_h * cells_w
        dst_idx, src_idx = order[:, :n_dst], order[:, n_dst:]

        def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            c = x.shape[-1]
            return (x.gather(1, src_idx.expand(x.shape[0], -1, c)), x.gather(1, dst_idx.expand(x.shape[0], -1, c)))

        normed = metric / metric.norm(dim=-1, keepdim=True)
        a, b = split(normed)
        scores = a @ b.transpose(-1, -2)
        r = min(a.shape[1], r)
        best_value, best_dst = scores.max(dim=-1)
        ranked = best_value.argsort(dim=-1, descending=True)[..., None]
        kept_src = ranked[:, r:]  # sources that stay
        merged_src = ranked[:, :r]  # sources merged away
        merged_into = best_dst[..., None].gather(1, merged_src)

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = split(x)
        b_, _, c = src.shape
        kept = src.gather(1, kept_src.expand(b_, -1, c))
        moved = src.gather(1, merged_src.expand(b_, -1, c))
        dst = dst.scatter_reduce(1, merged_into.expand(b_, -1, c), moved, reduce="mean")
        return torch.cat([kept, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        n_kept = kept_src.shape[1]
        kept, dst = x[:, :n_kept], x[:, n_kept:]
        b_, _, c = x.shape
        moved = dst.gather(1, merged_into.expand(b_, -1, c))
        out = torch.zeros(b_, tokens, c, device=x.device, dtype=x.dtype)
        out.scatter_(1, dst_idx.expand(b_, -1, c), dst)
        out.scatter_(1, src_idx.expand(b_, -1, 1).gather(1, kept_src).expand(b_, -1, c), kept)
        out.scatter_(1, src_idx.expand(b_, -1, 1).gather(1, merged_src).expand(b_, -1, c), moved)
        return out

    return merge, unmerge


class TokenMerging:
    """Wraps the self-attention of a UNet's transformer blocks for one generation."""

    def __init__(self, unet: torch.nn.Module, settings: ToMeSettings, seed: int | None = None) -> None:
        import torch

        self.unet = unet
        self.settings = settings
        self.latent_hw: tuple[int, int] | None = None
        self.merged_calls = 0
        self.generator = torch.Generator().manual_seed(seed) if settings.random and seed is not None else None
        if settings.random and self.generator is None:
            self.generator = torch.Generator().manual_seed(0)
        self._hook = unet.register_forward_pre_hook(self._note_size, with_kwargs=True)
        self._patches = AttributePatches()
        for module in unet.modules():
            attn = getattr(module, "attn1", None)
            if attn is None or not hasattr(module, "attn2"):
                continue
            self._patches.set(attn, "forward", self._wrap(attn.forward))

    def restore(self) -> None:
        self._hook.remove()
        self._patches.restore()

    def _note_size(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))

    def _wrap(self, forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def merged_forward(hidden_states: torch.Tensor, encoder_hidden_states: Any = None, attention_mask: Any = None, **kwargs: Any):
            plan = self._plan(hidden_states) if encoder_hidden_states is None and attention_mask is None else None
            if plan is None:
                return forward(hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs)
            merge, unmerge = plan
            self.merged_calls += 1
            return unmerge(forward(merge(hidden_states), **kwargs))

        return merged_forward

    def _plan(self, hidden_states: torch.Tensor) -> tuple[Merge, Merge] | None:
        if hidden_states.dim() != 3 or self.latent_hw is None:
            return None
        height, width = self.latent_hw
        tokens = hidden_states.shape[1]
        downsample = math.ceil(math.sqrt(height * width / tokens))
        if downsample > self.settings.max_downsample:
            return None
        h, w = math.ceil(height / downsample), math.ceil(width / downsample)
        if h * w != tokens:
            return None
        r = int(tokens * self.settings.ratio)
        return bipartite_soft_matching(hidden_states, h, w, self.settings.stride, r, self.generator)


@contextmanager
def activate(context: AdapterContext) -> Iterator[AdapterActivation]:
    if len(context.units) > 1:
        raise InvalidParameter("tome", len(context.units), "at most one token-merging unit per generation")
    check_patchable_unet(context.model, "Token merging")
    settings = ToMeSettings.from_options(context.units[0].options)
    merging = TokenMerging(context.model.unet, settings, seed=context.request.seed)
    try:
        yield AdapterActivation(infotext={"ToMe": f"ratio {settings.ratio:g}, max downsample {settings.max_downsample}"})
    finally:
        merging.restore()


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(
        AdapterSpec(
            name="tome",
            activate=activate,
            aliases=("token-merging",),
            description="Token merging (ToMe for SD): merge similar image tokens before self-attention (speed)",
        )
    )


_INFOTEXT = re.compile(r"^ratio ([0-9.]+), max downsample (\d+)$")


def units_from_args(args: argparse.Namespace, png_params: dict[str, str]) -> list[AdapterUnit]:
    """``--tome RATIO[:MAX_DOWNSAMPLE]``, or the ``ToMe`` entry of a ``--from-png`` image."""
    text = getattr(args, "tome", None)
    if text is None:
        match = _INFOTEXT.match(png_params.get("ToMe", ""))
        return [AdapterUnit("tome", {"ratio": float(match[1]), "max_downsample": int(match[2])})] if match else []
    ratio, _, downsample = text.partition(":")
    try:
        options = {"ratio": float(ratio), "max_downsample": int(downsample or 1)}
    except ValueError as exc:
        raise InvalidParameter("--tome", text, "RATIO or RATIO:MAX_DOWNSAMPLE, e.g. 0.5 or 0.5:2") from exc
    return [AdapterUnit("tome", options)]


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint.cli.api import add_adapter_unit_builder, generation_parsers

    for parser in generation_parsers(subparsers):
        parser.add_argument("--tome", metavar="RATIO[:MAX_DOWNSAMPLE]",
                            help="token merging: merge this fraction of image tokens before self-attention (speed)")
        add_adapter_unit_builder(parser, units_from_args)
