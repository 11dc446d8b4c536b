"""The user-facing pipeline: load a model once, then generate."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aipaint import __version__, image_modes
from aipaint.adapters import AdapterActivation, AdapterContext, AdapterSpec
from aipaint.denoise import DenoiseJob, LoopContributor, ModelHandoff, StepConditioning, denoise
from aipaint.errors import InvalidParameter, UnsupportedFeature
from aipaint.infotext import Infotext, build_params
from aipaint.model import Conditioning, LatentDiffusionModel
from aipaint.noise import initial_noise as initial_noise  # re-exported: plugins draw noise with it
from aipaint.noise import request_noise, seed_infotext
from aipaint.params import GenerationRequest
from aipaint.plugins import PluginHost, default_host
from aipaint.result import Result
from aipaint.samplers import SamplerSpec
from aipaint.sampling_plans import SamplingPlan

Progress = Callable[[int, int], None]


def make_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: item i of a batch uses seed + i."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def refiner_model(refiner: Any) -> LatentDiffusionModel:
    """The model behind a request's ``refiner`` (a loaded Pipeline or model)."""
    model = getattr(refiner, "model", refiner)
    if not isinstance(model, LatentDiffusionModel):
        raise InvalidParameter("refiner", refiner, "must be a loaded latent diffusion model: refiner=aipaint.load(<refiner model>)")
    return model


def latents_to_images(images: torch.Tensor) -> list[Any]:
    from PIL import Image

    array = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in array]


def _not_encoded_yet(step: int) -> StepConditioning:
    raise RuntimeError("this PreparedRun was planned with encode=False and its prompts were never encoded")


def _chain(rewrites: list[Callable[[str], str]]) -> Callable[[str], str]:
    def rewrite(text: str) -> str:
        for fn in rewrites:
            text = fn(text)
        return text

    return rewrite


@dataclass
class PreparedRun:
    """Everything decided before the loop starts (shared by txt2img and image modes)."""

    request: GenerationRequest
    sampler: SamplerSpec
    plan: SamplingPlan
    generators: list[torch.Generator]
    conditioning_at: Callable[[int], StepConditioning]
    latent_shape: tuple[int, int, int]
    prompt: Any  # aipaint.prompt.ParsedPrompt


class Pipeline:
    """A loaded model plus the plugins that can act on it.

    >>> import aipaint
    >>> pipe = aipaint.load()                      # the embedded model, offline
    >>> result = pipe.txt2img("a big red circle on the left, on a white background", seed=1)
    >>> result.save("circle.png")
    """

    def __init__(self, model: LatentDiffusionModel, host: PluginHost | None = None) -> None:
        self.model = model
        self.host = host or default_host()

    @classmethod
    def load(cls, source: str | Path | None = None, *, host: PluginHost | None = None, **options: Any) -> Pipeline:
        """Load a model: a zoo id, a diffusers folder, a single-file checkpoint or a hub id.

        With no source, the embedded default model. Options: ``family``, ``device``,
        ``dtype``, ``runtime``, ``allow_pickle`` (default False), ``config``.
        """
        from aipaint.loading import load_model

        host = host or default_host()
        model = load_model(source, host=host, **options)
        # A family whose models need another loop (pixel cascades, unCLIP) names its pipeline class.
        cls = getattr(model, "pipeline_class", None) or cls
        return cls(model, host)

    # --- public modes -------------------------------------------------------------------
    def txt2img(self, prompt: str, negative_prompt: str = "", *, progress: Progress | None = None, **params: Any) -> Result:
        """Text to image. Parameters as in :class:`aipaint.params.GenerationRequest`."""
        return self.generate(GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, **params), progress=progress)

    def img2img(
        self,
        image: Any,
        prompt: str,
        negative_prompt: str = "",
        *,
        denoising_strength: float = 0.75,
        resize_mode: str = "just resize",
        progress: Progress | None = None,
        **params: Any,
    ) -> Result:
        """Image to image: ``image`` (PIL image, array or path) noised to ``denoising_strength``
        and denoised towards the prompt. See :mod:`aipaint.image_modes`."""
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative_prompt, init_image=image,
            denoising_strength=denoising_strength, resize_mode=resize_mode, **params,
        )
        return self.generate(request, progress=progress)

    def inpaint(
        self,
        image: Any,
        mask: Any,
        prompt: str,
        negative_prompt: str = "",
        *,
        denoising_strength: float = 0.75,
        mask_blur: int = 4,
        inpainting_fill: str = "original",
        inpaint_full_res: bool = False,
        inpaint_full_res_padding: int = 32,
        inpainting_mask_invert: bool = False,
        progress: Progress | None = None,
        **params: Any,
    ) -> Result:
        """Repaint the white part of ``mask``; pixels outside the blurred mask stay exactly as they were."""
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative_prompt, init_image=image, mask=mask,
            denoising_strength=denoising_strength, mask_blur=mask_blur, inpainting_fill=inpainting_fill,
            inpaint_full_res=inpaint_full_res, inpaint_full_res_padding=inpaint_full_res_padding,
            inpainting_mask_invert=inpainting_mask_invert, **params,
        )
        return self.generate(request, progress=progress)

    def outpaint(
        self,
        image: Any,
        prompt: str,
        negative_prompt: str = "",
        *,
        left: int = 0,
        top: int = 0,
        right: int = 0,
        bottom: int = 0,
        fill: str = "edge",
        mask_blur: int = 8,
        denoising_strength: float = 1.0,
        progress: Progress | None = None,
        **params: Any,
    ) -> Result:
        """Extend ``image`` by the given pixels on each side and paint the new area; the
        original pixels stay unchanged. ``fill``: ``edge``, ``blur`` or ``noise``. The same as
        :meth:`generate` with the request fields ``outpaint_left`` … ``outpaint_fill``."""
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative_prompt, init_image=image,
            denoising_strength=denoising_strength, mask_blur=mask_blur, outpaint_left=left, outpaint_top=top,
            outpaint_right=right, outpaint_bottom=bottom, outpaint_fill=fill, **params,
        )
        return image_modes.outpaint(self, request, progress)

    def generate(self, request: GenerationRequest, progress: Progress | None = None) -> Result:
        if request.outpaints:
            return image_modes.outpaint(self, request, progress)
        if request.init_image is not None:
            return image_modes.generate_from_image(self, request, progress)
        started = time.perf_counter()
        with self.activate(request) as (prepared, contributors, adapter_info):
            contributors.extend(image_modes.txt2img_contributors(self.model, prepared))
            noise = self.noise(prepared)
            latents = prepared.plan.initial_latents(noise).to(self.model.device, self.model.dtype)
            timings = {"prepare": time.perf_counter() - started}
            latents = self.run_loop(prepared, latents, contributors, progress=progress)
            timings["denoise"] = time.perf_counter() - started - timings["prepare"]
        images = self.decode(latents)
        timings["decode"] = time.perf_counter() - started - timings["prepare"] - timings["denoise"]
        timings["total"] = time.perf_counter() - started
        return self.make_result(prepared.request, images, adapter_info, timings)

    # --- building blocks (used by the image-conditioned modes and by plugins) ------------
    def noise(self, prepared: PreparedRun) -> torch.Tensor:
        """The run's starting noise, per image seed, with A1111's variation seed and seed resize."""
        return request_noise(prepared.request, prepared.latent_shape, prepared.generators, self.model.vae_scale_factor)

    def prepare(self, request: GenerationRequest, *, encode: bool = True) -> PreparedRun:
        """Plan a run. ``encode=False`` leaves step 4 (prompt encoding) to the caller:
        :meth:`activate` encodes only after the adapters are active, because LoRA
        text-encoder weights and textual-inversion tokens change what the prompt encodes to."""
        from aipaint.prompt import PromptWarning, parse_negative_prompt, parse_prompt

        model = self.model
        # 1. Fill in the model's defaults, pick a seed, check names against the registry.
        request = request.with_defaults(model.defaults).with_seed()
        sampler = self.host.registry.samplers.get(request.sampler)
        sampler.check_schedule(request.schedule)
        factor = model.vae_scale_factor
        if request.width % factor or request.height % factor:
            raise InvalidParameter("size", f"{request.width}x{request.height}", f"must be a multiple of {factor} for this model")
        # 2. Parse the prompts once; what the parser kept as text instead of reading it is said.
        parsed = parse_prompt(request.prompt)
        negative = parse_negative_prompt(request.negative_prompt)
        for message in (*parsed.warnings, *negative.warnings):
            warnings.warn(f"aipaint: {message}", PromptWarning, stacklevel=3)
        # 3. The sampler's plan over the model's own noise schedule.
        plan = sampler.plan(model.scheduler_config, request.schedule, request.steps, device=model.device, seeds=request.seeds)
        # 4. Conditioning for every distinct prompt text in the schedule, encoded once.
        conditioning_at = self._conditioning_schedule(parsed, negative, request) if encode else _not_encoded_yet
        generators = make_generators(request.seeds)
        shape = (model.latent_channels, request.height // factor, request.width // factor)
        return PreparedRun(request, sampler, plan, generators, conditioning_at, shape, parsed)

    def _conditioning_schedule(
        self, parsed: Any, negative: Any, request: GenerationRequest, rewrite: Callable[[str], str] | None = None
    ) -> Callable[[int], StepConditioning]:
        """``rewrite`` (from active adapters) changes each resolved text just before encoding."""
        from aipaint.prompt import prompt_at_step

        def encode_texts(texts: list[str]) -> list[Conditioning]:
            texts = [rewrite(t) for t in texts] if rewrite is not None else texts
            return self.model.encode_texts(texts, request.clip_skip, request.emphasis)

        steps = request.steps
        cache: dict[tuple[Any, ...], StepConditioning] = {}
        texts_cache: dict[str, Conditioning] = {}

        def encode(texts: list[str]) -> list[Conditioning]:
            missing = [t for t in dict.fromkeys(texts) if t not in texts_cache]
            if missing:
                for text, cond in zip(missing, encode_texts(missing), strict=True):
                    texts_cache[text] = cond
            return [texts_cache[t] for t in texts]

        def conditioning_at(step: int) -> StepConditioning:
            positive_parts = prompt_at_step(parsed, step, steps) or (("", 1.0),)
            ((negative_text, _),) = prompt_at_step(negative, step, steps)  # a negative prompt is one text
            key = (positive_parts, negative_text)
            if key not in cache:
                texts = [t for t, _ in positive_parts] + [negative_text]
                conds = encode(texts)
                length = max(c.embeds.shape[1] for c in conds)
                if any(c.embeds.shape[1] != length for c in conds):  # pad to a common length by re-encoding
                    texts_cache.clear()
                    conds = encode_texts(texts)
                    for text, cond in zip(texts, conds, strict=True):
                        texts_cache[text] = cond
                positives = [
                    (self.model.request_conditioning(c, text=t, negative=False, request=request), w)
                    for c, (t, w) in zip(conds[:-1], positive_parts, strict=True)
                ]
                negative_cond = self.model.request_conditioning(conds[-1], text=texts[-1], negative=True, request=request)
                cache[key] = StepConditioning(positives, negative_cond)
            return cache[key]

        conditioning_at(0)  # encode up front so errors surface before the loop
        return conditioning_at

    @contextmanager
    def activate(
        self, request: GenerationRequest, extra_contributors: list[LoopContributor] | None = None
    ) -> Iterator[tuple[PreparedRun, list[LoopContributor], dict[str, str]]]:
        """Prepare a run and activate the adapters it needs; restores everything on exit.

        The order matters: (1) plan the run and parse the prompts (adapters need the parsed
        prompt: its ``<lora:…>`` tags); (2) activate the adapters (weight patches, added
        tokens); (3) only then encode the prompts, so the conditioning sees the patched text
        encoder and the adapters' text rewrites; (4) the caller runs the loop inside.
        """
        from aipaint.prompt import parse_negative_prompt

        prepared = self.prepare(request, encode=False)
        contributors: list[LoopContributor] = list(extra_contributors or [])
        info: dict[str, str] = {}
        with ExitStack() as stack:
            rewrites = []
            for activation in self._activate_adapters(prepared, stack):
                contributors.extend(activation.contributors)
                info.update(activation.infotext)
                if activation.rewrite_text is not None:
                    rewrites.append(activation.rewrite_text)
            request = prepared.request
            prepared.conditioning_at = self._conditioning_schedule(
                prepared.prompt, parse_negative_prompt(request.negative_prompt), request, _chain(rewrites) if rewrites else None
            )
            yield prepared, contributors, info

    def _activate_adapters(self, prepared: PreparedRun, stack: ExitStack) -> list[AdapterActivation]:
        request = prepared.request
        registry = self.host.registry.adapters
        loras = tuple(prepared.prompt.loras)
        tags = (*loras, *prepared.prompt.extra_networks)
        claimed: set[int] = set()
        activations = []
        for spec in registry:
            spec: AdapterSpec
            refs = tuple(r for r in tags if getattr(r, "kind", "lora") in spec.prompt_tags)
            units = tuple(u for u in request.adapters if registry.get(u.kind) is spec) if request.adapters else ()
            context = AdapterContext(self.model, request, refs, units, request.height, request.width, host=self.host)
            if not refs and not units and not (spec.wants is not None and spec.wants(context)):
                continue
            claimed.update(id(r) for r in refs)
            activations.append(stack.enter_context(spec.activate(context)))
        unclaimed = [r for r in loras if id(r) not in claimed]
        if unclaimed:
            names = ", ".join(f"<lora:{r.name}>" for r in unclaimed)
            raise UnsupportedFeature(
                f"the prompt uses {names}, but no installed adapter handles LoRA tags; "
                "install a LoRA adapter plugin or remove the tag"
            )
        ignored = [r for r in prepared.prompt.extra_networks if id(r) not in claimed]
        if ignored:  # A1111 skips extra networks it has no handler for; so does aipaint, but never silently
            from aipaint.prompt import PromptWarning

            kinds = ", ".join(dict.fromkeys(repr(r.kind) for r in ignored))
            warnings.warn(
                f"aipaint: the prompt's {', '.join(r.tag for r in ignored)} {'tag was' if len(ignored) == 1 else 'tags were'} "
                f"removed and ignored: no installed adapter handles {kinds} tags (A1111 skips them too; "
                "`aipaint plugins` lists the adapters)",
                PromptWarning,
                stacklevel=4,
            )
        return activations

    def run_loop(
        self,
        prepared: PreparedRun,
        latents: torch.Tensor,
        contributors: list[LoopContributor],
        *,
        start: int = 0,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        request = prepared.request
        job = DenoiseJob(
            model=self.model,
            plan=prepared.plan,
            conditioning_at=prepared.conditioning_at,
            cfg_scale=float(request.cfg_scale),
            guidance_rescale=float(request.guidance_rescale or 0.0),
            skip_early_cfg=float(request.skip_early_cfg),
            contributors=contributors,
            handoff=self._refiner_handoff(prepared) if request.refiner is not None else None,
        )
        return denoise(job, latents, prepared.generators, start=start, progress=progress)

    def _refiner_handoff(self, prepared: PreparedRun) -> ModelHandoff | None:
        """The refiner's part of the loop: the steps whose timestep lies below the switch point
        (diffusers' ``denoising_end``/``denoising_start`` and A1111 cut at the same timestep)."""
        from aipaint.prompt import parse_negative_prompt

        request = prepared.request
        refiner = refiner_model(request.refiner)
        main = self.model
        if (refiner.latent_channels, refiner.vae_scale_factor, refiner.scaling_factor) != (
            main.latent_channels, main.vae_scale_factor, main.scaling_factor
        ):
            raise InvalidParameter("refiner", refiner.name, f"must share the latent space of {main.name!r} (channels, VAE factor, scaling)")
        if request.refiner_switch_at >= 1.0:
            return None
        train_steps = int(main.scheduler_config.get("num_train_timesteps", 1000))
        cutoff = int(round(train_steps * (1.0 - request.refiner_switch_at)))
        conditioning_at = Pipeline(refiner, self.host)._conditioning_schedule(
            prepared.prompt, parse_negative_prompt(request.negative_prompt), request
        )
        return ModelHandoff(refiner, conditioning_at, cutoff)

    def decode(self, latents: torch.Tensor) -> list[Any]:
        with torch.inference_mode():
            return latents_to_images(self.model.decode(latents))

    def infotext_params(self, request: GenerationRequest, seed: int, extra: dict[str, str]) -> dict[str, str]:
        model = self.model
        values: dict[str, Any] = {
            "Steps": request.steps,
            "Sampler": self.host.registry.samplers.get(request.sampler).name,
            "Schedule type": request.schedule,
            "CFG scale": request.cfg_scale,
            "Seed": seed,
            "Size": f"{request.width}x{request.height}",
            "Model hash": model.model_hash,
            "Model": model.name,
            **seed_infotext(request, seed),
        }
        if request.clip_skip > 1:
            values["Clip skip"] = request.clip_skip
        if request.guidance_rescale:
            values["Guidance rescale"] = request.guidance_rescale
        if request.skip_early_cfg and request.cfg_scale > 1:
            values["Skip Early CFG"] = request.skip_early_cfg
        if request.emphasis == "none":
            values["Emphasis"] = "No norm"
        elif model.defaults.emphasis != "a1111":  # A1111's default, said when this model's differs
            values["Emphasis"] = "Original"
        if request.refiner is not None:
            refiner = refiner_model(request.refiner)
            values["Refiner"] = f"{refiner.name} [{refiner.model_hash}]" if refiner.model_hash else refiner.name
            values["Refiner switch at"] = request.refiner_switch_at
        values.update(extra)
        values["Version"] = f"aipaint {__version__}"
        return build_params(values)

    def make_result(self, request: GenerationRequest, images: list[Any], extra: dict[str, str], timings: dict[str, float]) -> Result:
        infotexts = [
            Infotext(request.prompt, request.negative_prompt, self.infotext_params(request, seed, extra)).to_text()
            for seed in request.seeds
        ]
        return Result(images=images, seeds=request.seeds, infotexts=infotexts, request=request, timings=timings)

    def __repr__(self) -> str:
        return f"<aipaint.Pipeline {self.model!r}>"
