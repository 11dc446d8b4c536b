"""DeepCache: reuse the UNet's deep features between neighbouring steps (opt-in).

Ma, Fang and Wang, "DeepCache: Accelerating Diffusion Models for Free" (CVPR 2024):
the high-level features that the deep part of a UNet hands to its last up-blocks change
little from one denoising step to the next, while the shallow skip branch carries the
detail. So every ``interval`` UNet calls the whole UNet runs and the input of the
up-block that closes the shallow branch is kept; the calls in between run only the
shallow branch — ``conv_in``, the first ``branch + 1`` down-blocks, the last
``branch + 1`` up-blocks fed with the cached feature, and the output layers.

Opt in per generation with an adapter unit::

    from aipaint.adapters import AdapterUnit
    pipe.txt2img(prompt, adapters=(AdapterUnit("deepcache", {"interval": 3, "branch": 0}),))

An adapter unit (rather than a request field) because that is aipaint's one seam for
"something that changes how the loop's networks behave for this generation and is
restored afterwards", it composes with the other adapters, and it records itself in
the A1111 infotext (``DeepCache: interval 3, branch 0``). The UNet's ``forward`` is
wrapped on activation and restored on exit, even on error. Needs the eager torch
runtime: an exported UNet (ONNX, TensorRT) has no deep features to cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aipaint import hookimpl
from aipaint.adapters import AdapterActivation, AdapterSpec
from aipaint.errors import InvalidParameter, UnsupportedFeature

if TYPE_CHECKING:
    import torch

    from aipaint.adapters import AdapterContext

OPTIONS = ("interval", "branch")


@dataclass(frozen=True)
class DeepCacheSettings:
    interval: int = 3
    branch: int = 0

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
            raise InvalidParameter("deepcache branch", branch, f"a block index from 0 to {max_branch} for this UNet",
                                   "0 caches the most, and is the fastest")
        return cls(interval, branch)


@dataclass
class DeepCacheStats:
    full_calls: int = 0
    cached_calls: int = 0


class DeepCacheUNet:
    """Wraps one UNet's ``forward`` for one generation; :meth:`restore` puts it back."""

    def __init__(self, unet: torch.nn.Module, settings: DeepCacheSettings) -> None:
        self.unet = unet
        self.settings = settings
        self.stats = DeepCacheStats()
        self.calls = 0
        self.cache: tuple[tuple[Any, ...], torch.Tensor] | None = None
        self.closing_block = len(unet.up_blocks) - 1 - settings.branch
        self.consumed = sum(len(b.resnets) for b in unet.up_blocks[self.closing_block:])
        self._had_forward = "forward" in vars(unet)
        self._previous_forward = vars(unet).get("forward")
        self._original_forward = unet.forward
        self._capture: torch.Tensor | None = None
        self._hook = unet.up_blocks[self.closing_block].register_forward_pre_hook(self._grab, with_kwargs=True)
        unet.forward = self.forward

    def restore(self) -> None:
        self._hook.remove()
        if self._had_forward:
            self.unet.forward = self._previous_forward
        else:
            del self.unet.forward

    def _grab(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._capture = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

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
        unet = self.unet
        up_factor = 2 ** unet.num_upsamplers
        forward_upsample_size = any(dim % up_factor for dim in sample.shape[-2:])
        # 1. time (and family conditioning such as SDXL's added embeddings)
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs or {})
        if aug is not None:
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        encoder_hidden_states = unet.process_encoder_hidden_states(encoder_hidden_states, added_cond_kwargs or {})
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        # 2. the shallow down path
        hidden = unet.conv_in(sample)
        residuals: tuple[torch.Tensor, ...] = (hidden,)
        for block in unet.down_blocks[: self.settings.branch + 1]:
            if getattr(block, "has_cross_attention", False):
                hidden, res = block(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states,
                                    cross_attention_kwargs=cross_attention_kwargs)
            else:
                hidden, res = block(hidden_states=hidden, temb=emb)
            residuals += res
        residuals = residuals[: self.consumed]  # the rest feeds the deep part, which is cached
        if down_block_additional_residuals is not None:
            residuals = tuple(r + a for r, a in zip(residuals, down_block_additional_residuals[: self.consumed]))
        # 3. the last up-blocks, fed with the cached deep feature
        hidden = deep
        blocks = unet.up_blocks[self.closing_block:]
        for index, block in enumerate(blocks):
            res = residuals[-len(block.resnets):]
            residuals = residuals[: -len(block.resnets)]
            upsample_size = residuals[-1].shape[2:] if forward_upsample_size and index < len(blocks) - 1 else None
            if getattr(block, "has_cross_attention", False):
                hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res,
                               encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs,
                               upsample_size=upsample_size)
            else:
                hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)
        # 4. output
        if unet.conv_norm_out:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)


def max_branch(unet: Any) -> int:
    """The deepest branch that still leaves a deep part to cache."""
    return max(0, len(unet.down_blocks) - 2)


def check_patchable_unet(model: Any, feature: str) -> None:
    """Speed features patch the torch UNet: refuse runtimes and compiled UNets they cannot reach."""
    if getattr(model, "runtime", "torch") != "torch":
        raise UnsupportedFeature(
            f"{feature} patches the torch UNet, but this model runs on the {model.runtime!r} runtime; "
            "load it with runtime='torch' to use it"
        )
    if getattr(model.unet, "_compiled_call_impl", None) is not None:
        raise UnsupportedFeature(f"{feature} cannot patch a torch.compile'd UNet; load without compile=True to use it")
    if not hasattr(model.unet, "up_blocks"):
        raise UnsupportedFeature(f"{feature} needs a diffusers UNet2DConditionModel, not {type(model.unet).__name__}")


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
