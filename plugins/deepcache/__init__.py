"""DeepCache: reuse the UNet's deep features between neighbouring steps (opt-in).

Ma, Fang and Wang, "DeepCache: Accelerating Diffusion Models for Free" (CVPR 2024):
the high-level features that the deep part of a UNet hands back up change little from
one denoising step to the next, while the shallow skip connections carry the detail.
So every ``interval`` UNet calls the whole UNet runs, and the feature entering the
up-layer that consumes skip connection number ``branch`` is kept; the calls in between
recompute only the shallow branch: ``conv_in`` and the down layers that make skips
``0…branch``, then the up layers that consume them, fed with the kept feature, and the
output layers. Skips are numbered from the shallowest: 0 is ``conv_in``'s output, 1 the
first down layer's, and so on (12 in SD1.5); ``branch=0`` recomputes the least.

Opt in per generation with an adapter unit::

    from aipaint.plugin.adapters import AdapterUnit
    pipe.txt2img(prompt, adapters=(AdapterUnit("deepcache", {"interval": 4, "branch": 1}),))

An adapter unit (rather than a request field) because that is aipaint's one seam for
"something that changes how the loop's networks behave for this generation and is
restored afterwards", it composes with the other adapters (ControlNet residuals are
added to the recomputed skips), and it records itself in the A1111 infotext
(``DeepCache: interval 4, branch 1``). The UNet's ``forward`` is wrapped on activation
and restored on exit, even on error. Needs the eager torch runtime: an exported UNet
(ONNX, TensorRT) has no deep features to keep.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aipaint import hookimpl
from aipaint.errors import InvalidParameter, UnsupportedFeature
from aipaint.plugin.adapters import AdapterActivation, AdapterSpec, AdapterUnit
from aipaint.plugin.kit.patches import AttributePatches, check_patchable_unet

if TYPE_CHECKING:
    import argparse

    import torch

    from aipaint.plugin.adapters import AdapterContext

OPTIONS = ("interval", "branch")


@dataclass(frozen=True)
class DeepCacheSettings:
    """Defaults measured on the embedded model (benchmarks/results/speed_features.txt): the
    denoising loop 1.80× faster (whole txt2img 1.72×) for 2.8 adherence points fewer.
    ``branch=0`` is faster still, at a larger cost; ``interval=3`` keeps closer to the plain image."""

    interval: int = 4
    branch: int = 1

    @classmethod
    def from_options(cls, options: Mapping[str, Any], max_branch: int) -> DeepCacheSettings:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise InvalidParameter("deepcache", unknown, f"options are {', '.join(OPTIONS)}")
        interval = options.get("interval", cls.interval)
        branch = options.get("branch", cls.branch)
        if isinstance(interval, bool) or not isinstance(interval, int) or not 1 <= interval <= 100:
            raise InvalidParameter("deepcache interval", interval, "a whole number of UNet calls from 1 to 100",
                                   "1 runs the whole UNet every call (no caching)")
        if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch <= max_branch:
            raise InvalidParameter("deepcache branch", branch, f"a skip-connection index from 0 to {max_branch} for this UNet",
                                   "0 recomputes the least: fastest, furthest from the plain image")
        return cls(interval, branch)


@dataclass
class DeepCacheStats:
    full_calls: int = 0
    cached_calls: int = 0


@dataclass(frozen=True)
class Skip:
    """One skip connection of the UNet: who makes it (down path) and who consumes it (up path)."""

    channels: int
    down_block: int  # -1: conv_in
    down_layer: int  # index among the block's layers; -1 for its down-sampler
    up_block: int
    up_layer: int


def skip_layout(unet: Any) -> list[Skip]:
    """The skip connections in diffusers' order (conv_in first), with their up-path consumers.

    Up-blocks pop residuals from the end, so the skips are consumed deepest first; the
    skip ``b`` is consumed by one layer of one up-block, and everything after that layer
    consumes only skips shallower than ``b``.
    """
    channels = list(unet.config.block_out_channels)
    made: list[tuple[int, int, int]] = [(channels[0], -1, 0)]
    for index, block in enumerate(unet.down_blocks):
        made.extend((channels[index], index, layer) for layer in range(len(block.resnets)))
        if getattr(block, "downsamplers", None):
            made.append((channels[index], index, -1))
    consumers: dict[int, tuple[int, int]] = {}
    remaining = list(range(len(made)))
    for up_index, block in enumerate(unet.up_blocks):
        taken, remaining = remaining[-len(block.resnets):], remaining[: -len(block.resnets)]
        for layer in range(len(block.resnets)):
            consumers[taken[-(layer + 1)]] = (up_index, layer)
    return [Skip(c, b, layer, *consumers[i]) for i, (c, b, layer) in enumerate(made)]


SUPPORTED_BLOCKS = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}


class DeepCacheUNet:
    """Wraps one UNet's ``forward`` for one generation; :meth:`restore` puts it back.

    ``branch`` numbers the skip connections from the shallowest (0: the output of
    ``conv_in``). A cached call recomputes only what produces skips ``0…branch`` on the
    way down and what consumes them on the way up; the input of the up-layer that consumes
    skip ``branch`` comes from the last full call.
    """

    def __init__(self, unet: torch.nn.Module, settings: DeepCacheSettings) -> None:
        blocks = [type(b).__name__ for b in (*unet.down_blocks, *unet.up_blocks)]
        unsupported = sorted(set(blocks) - SUPPORTED_BLOCKS)
        if unsupported:
            raise UnsupportedFeature(f"DeepCache supports diffusers' standard UNet blocks, not {', '.join(unsupported)}")
        if any(getattr(b, "s1", None) for b in unet.up_blocks):
            raise UnsupportedFeature("DeepCache cannot be combined with FreeU (it changes the skip connections)")
        self.unet = unet
        self.settings = settings
        self.stats = DeepCacheStats()
        self.calls = 0
        self.cache: tuple[tuple[Any, ...], torch.Tensor] | None = None
        self.skips = skip_layout(unet)
        self.skip = self.skips[settings.branch]
        self._original_forward = unet.forward
        self._capture: torch.Tensor | None = None
        consumer = unet.up_blocks[self.skip.up_block].resnets[self.skip.up_layer]
        self._hook = consumer.register_forward_pre_hook(self._grab)
        self._patches = AttributePatches()
        self._patches.set(unet, "forward", self.forward)

    def restore(self) -> None:
        self._hook.remove()
        self._patches.restore()

    def _grab(self, module: Any, args: tuple[Any, ...]) -> None:
        # The consumer's input is cat([deep feature, skip]); keep the deep part.
        joined = args[0]
        self._capture = joined[:, : joined.shape[1] - self.skip.channels]

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise UnsupportedFeature("DeepCache needs the UNet's optional arguments by keyword")
        unsupported = sorted(
            k for k in ("class_labels", "timestep_cond", "attention_mask", "encoder_attention_mask",
                        "down_intrablock_additional_residuals")
            if kwargs.get(k) is not None
        )
        if unsupported or (kwargs.get("cross_attention_kwargs") or {}).get("gligen") is not None:
            raise UnsupportedFeature(f"DeepCache does not support the UNet arguments {unsupported or ['gligen']}")
        key = (tuple(sample.shape), tuple(encoder_hidden_states.shape), sample.dtype, sample.device)
        cached = self.cache is not None and self.cache[0] == key
        call = self.calls
        self.calls += 1
        if call % self.settings.interval == 0 or not cached:
            self._capture = None
            out = self._original_forward(sample, timestep, encoder_hidden_states, **kwargs)
            if self._capture is None:
                raise UnsupportedFeature("DeepCache found no feature to cache: this UNet skips its up-blocks")
            self.cache = (key, self._capture)
            self._capture = None
            self.stats.full_calls += 1
            return out
        self.stats.cached_calls += 1
        sample_out = self._shallow(sample, timestep, encoder_hidden_states, self.cache[1], **kwargs)
        if not kwargs.get("return_dict", True):
            return (sample_out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=sample_out)

    def _shallow(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor,
        deep: torch.Tensor,
        *,
        added_cond_kwargs: dict[str, Any] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        down_block_additional_residuals: Any = None,
        mid_block_additional_residual: Any = None,
        return_dict: bool = True,
    ) -> torch.Tensor:
        """The UNet's forward restricted to the shallow branch (mirrors diffusers' UNet2DConditionModel.forward)."""
        import torch

        unet = self.unet
        branch = self.settings.branch
        up_factor = 2 ** unet.num_upsamplers
        forward_upsample_size = any(dim % up_factor for dim in sample.shape[-2:])
        # 1. time (and family conditioning such as SDXL's added embeddings)
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs or {})
        if aug is not None:
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        ehs = unet.process_encoder_hidden_states(encoder_hidden_states, added_cond_kwargs or {})
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        attend = {"encoder_hidden_states": ehs, "cross_attention_kwargs": cross_attention_kwargs}
        # 2. down: only what makes skips 0…branch
        hidden = unet.conv_in(sample)
        skips: list[torch.Tensor] = [hidden]
        for block in unet.down_blocks:
            if len(skips) > branch:
                break
            for layer, resnet in enumerate(block.resnets):
                if len(skips) > branch:
                    break
                hidden = resnet(hidden, emb)
                if getattr(block, "attentions", None) is not None:
                    hidden = block.attentions[layer](hidden, **attend, return_dict=False)[0]
                skips.append(hidden)
            if len(skips) <= branch and getattr(block, "downsamplers", None):
                for downsampler in block.downsamplers:
                    hidden = downsampler(hidden)
                skips.append(hidden)
        if down_block_additional_residuals is not None:
            skips = [s + a for s, a in zip(skips, down_block_additional_residuals)]
        # 3. up: from the layer that consumes skip `branch`, fed with the cached deep feature
        hidden = deep
        first_block = self.skip.up_block
        for index in range(first_block, len(unet.up_blocks)):
            block = unet.up_blocks[index]
            for layer in range(self.skip.up_layer if index == first_block else 0, len(block.resnets)):
                hidden = block.resnets[layer](torch.cat([hidden, skips.pop()], dim=1), emb)
                if getattr(block, "attentions", None) is not None:
                    hidden = block.attentions[layer](hidden, **attend, return_dict=False)[0]
            if block.upsamplers is not None:
                size = skips[-1].shape[2:] if forward_upsample_size and skips else None
                for upsampler in block.upsamplers:
                    hidden = upsampler(hidden, size)
        # 4. output
        if unet.conv_norm_out:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)


def max_branch(unet: Any) -> int:
    """The deepest branch: the last skip connection (what is cached is then the mid-block's output)."""
    return len(skip_layout(unet)) - 1


@contextmanager
def activate(context: AdapterContext) -> Iterator[AdapterActivation]:
    if len(context.units) > 1:
        raise InvalidParameter("deepcache", len(context.units), "at most one DeepCache unit per generation")
    model = context.model
    check_patchable_unet(model, "DeepCache")
    settings = DeepCacheSettings.from_options(context.units[0].options, max_branch(model.unet))
    wrapper = DeepCacheUNet(model.unet, settings)
    try:
        yield AdapterActivation(infotext={"DeepCache": f"interval {settings.interval}, branch {settings.branch}"})
    finally:
        wrapper.restore()


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(
        AdapterSpec(
            name="deepcache",
            activate=activate,
            aliases=("deep-cache",),
            description="DeepCache: run the whole UNet every N calls, only its shallow branch in between (speed)",
        )
    )


_INFOTEXT = re.compile(r"^interval (\d+), branch (\d+)$")


def units_from_args(args: argparse.Namespace, png_params: dict[str, str]) -> list[AdapterUnit]:
    """``--deepcache INTERVAL[:BRANCH]``, or the ``DeepCache`` entry of a ``--from-png`` image."""
    text = getattr(args, "deepcache", None)
    if text is None:
        match = _INFOTEXT.match(png_params.get("DeepCache", ""))
        return [AdapterUnit("deepcache", {"interval": int(match[1]), "branch": int(match[2])})] if match else []
    interval, _, branch = text.partition(":")
    if not interval.strip().isdigit() or (branch and not branch.strip().isdigit()):
        raise InvalidParameter("--deepcache", text, "INTERVAL or INTERVAL:BRANCH, whole numbers, e.g. 3 or 3:0")
    options = {"interval": int(interval)}
    if branch:
        options["branch"] = int(branch)
    return [AdapterUnit("deepcache", options)]


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint.cli.api import add_adapter_unit_builder, generation_parsers

    for parser in generation_parsers(subparsers):
        parser.add_argument("--deepcache", metavar="INTERVAL[:BRANCH]",
                            help="DeepCache: run the whole UNet every INTERVAL calls, the shallow branch in between (speed)")
        add_adapter_unit_builder(parser, units_from_args)
