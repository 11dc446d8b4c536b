"""The user-facing pipeline: load a model once, then generate."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aipaint import __version__
from aipaint.adapters import AdapterActivation, AdapterContext, AdapterSpec
from aipaint.denoise import DenoiseJob, LoopContributor, StepConditioning, denoise
from aipaint.errors import InvalidParameter, UnsupportedFeature
from aipaint.infotext import Infotext, build_params
from aipaint.model import Conditioning, LatentDiffusionModel
from aipaint.params import GenerationRequest
from aipaint.plugins import PluginHost, default_host
from aipaint.result import Result
from aipaint.samplers import SamplerSpec
from aipaint.sampling_plans import SamplingPlan

Progress = Callable[[int, int], None]


def make_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: item i of a batch uses seed + i."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def initial_noise(seeds: list[int], shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """Noise drawn on the CPU, per image, so CPU and GPU runs start from the same numbers."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])


def latents_to_images(images: torch.Tensor) -> list[Any]:
    from PIL import Image

    array = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in array]


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
        return cls(load_model(source, host=host, **options), host)

    # --- public modes -------------------------------------------------------------------
    def txt2img(self, prompt: str, negative_prompt: str = "", *, progress: Progress | None = None, **params: Any) -> Result:
        """Text to image. Parameters as in :class:`aipaint.params.GenerationRequest`."""
        return self.generate(GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, **params), progress=progress)

    def generate(self, request: GenerationRequest, progress: Progress | None = None) -> Result:
        started = time.perf_counter()
        with self.activate(request) as (prepared, contributors, adapter_info):
            noise = initial_noise(prepared.request.seeds, prepared.latent_shape, prepared.generators)
            latents = prepared.plan.initial_latents(noise).to(self.model.device, self.model.dtype)
            timings = {"prepare": time.perf_counter() - started}
            latents = self.run_loop(prepared, latents, contributors, progress=progress)
            timings["denoise"] = time.perf_counter() - started - timings["prepare"]
        images = self.decode(latents)
        timings["decode"] = time.perf_counter() - started - timings["prepare"] - timings["denoise"]
        timings["total"] = time.perf_counter() - started
        return self.make_result(prepared.request, images, adapter_info, timings)

    # --- building blocks (used by the image-conditioned modes and by plugins) ------------
    def prepare(self, request: GenerationRequest) -> PreparedRun:
        from aipaint.prompt import parse_prompt

        model = self.model
        # 1. Fill in the model's defaults, pick a seed, check names against the registry.
        request = request.with_defaults(model.defaults).with_seed()
        sampler = self.host.registry.samplers.get(request.sampler)
        sampler.check_schedule(request.schedule)
        factor = model.vae_scale_factor
        if request.width % factor or request.height % factor:
            raise InvalidParameter("size", f"{request.width}x{request.height}", f"must be a multiple of {factor} for this model")
        # 2. Parse the prompts once.
        parsed = parse_prompt(request.prompt)
        negative = parse_prompt(request.negative_prompt)
        # 3. The sampler's plan over the model's own noise schedule.
        plan = sampler.plan(model.scheduler_config, request.schedule, request.steps, device=model.device, seeds=request.seeds)
        # 4. Conditioning for every distinct prompt text in the schedule, encoded once.
        conditioning_at = self._conditioning_schedule(parsed, negative, request)
        generators = make_generators(request.seeds)
        shape = (model.latent_channels, request.height // factor, request.width // factor)
        return PreparedRun(request, sampler, plan, generators, conditioning_at, shape, parsed)

    def _conditioning_schedule(self, parsed: Any, negative: Any, request: GenerationRequest) -> Callable[[int], StepConditioning]:
        from aipaint.prompt import prompt_at_step

        steps = request.steps
        cache: dict[tuple[Any, ...], StepConditioning] = {}
        texts_cache: dict[str, Conditioning] = {}

        def encode(texts: list[str]) -> list[Conditioning]:
            missing = [t for t in dict.fromkeys(texts) if t not in texts_cache]
            if missing:
                for text, cond in zip(missing, self.model.encode_texts(missing, request.clip_skip, request.emphasis), strict=True):
                    texts_cache[text] = cond
            return [texts_cache[t] for t in texts]

        def conditioning_at(step: int) -> StepConditioning:
            positive_parts = prompt_at_step(parsed, step, steps) or (("", 1.0),)
            negative_parts = prompt_at_step(negative, step, steps) or (("", 1.0),)
            key = (positive_parts, negative_parts[0][0])
            if key not in cache:
                texts = [t for t, _ in positive_parts] + [negative_parts[0][0]]
                conds = encode(texts)
                length = max(c.embeds.shape[1] for c in conds)
                if any(c.embeds.shape[1] != length for c in conds):  # pad to a common length by re-encoding
                    texts_cache.clear()
                    conds = self.model.encode_texts(texts, request.clip_skip, request.emphasis)
                    for text, cond in zip(texts, conds, strict=True):
                        texts_cache[text] = cond
                positives = [(c, w) for c, (_, w) in zip(conds[:-1], positive_parts, strict=True)]
                cache[key] = StepConditioning(positives, conds[-1])
            return cache[key]

        conditioning_at(0)  # encode up front so errors surface before the loop
        return conditioning_at

    @contextmanager
    def activate(
        self, request: GenerationRequest, extra_contributors: list[LoopContributor] | None = None
    ) -> Iterator[tuple[PreparedRun, list[LoopContributor], dict[str, str]]]:
        """Prepare a run and activate the adapters it needs; restores everything on exit."""
        prepared = self.prepare(request)
        contributors: list[LoopContributor] = list(extra_contributors or [])
        info: dict[str, str] = {}
        with ExitStack() as stack:
            for activation in self._activate_adapters(prepared, stack):
                contributors.extend(activation.contributors)
                info.update(activation.infotext)
            yield prepared, contributors, info

    def _activate_adapters(self, prepared: PreparedRun, stack: ExitStack) -> list[AdapterActivation]:
        request = prepared.request
        registry = self.host.registry.adapters
        loras = tuple(prepared.prompt.loras)
        claimed: set[int] = set()
        activations = []
        for spec in registry:
            spec: AdapterSpec
            refs = tuple(r for r in loras if getattr(r, "kind", "lora") in spec.prompt_tags)
            units = tuple(u for u in request.adapters if registry.get(u.kind) is spec) if request.adapters else ()
            if not refs and not units:
                continue
            claimed.update(id(r) for r in refs)
            context = AdapterContext(self.model, request, refs, units, request.height, request.width)
            activations.append(stack.enter_context(spec.activate(context)))
        unclaimed = [r for r in loras if id(r) not in claimed]
        if unclaimed:
            names = ", ".join(f"<lora:{r.name}>" for r in unclaimed)
            raise UnsupportedFeature(
                f"the prompt uses {names}, but no installed adapter handles LoRA tags; "
                "install a LoRA adapter plugin or remove the tag"
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
            contributors=contributors,
        )
        return denoise(job, latents, prepared.generators, start=start, progress=progress)

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
        }
        if request.clip_skip > 1:
            values["Clip skip"] = request.clip_skip
        if request.guidance_rescale:
            values["Guidance rescale"] = request.guidance_rescale
        if request.emphasis != "a1111":
            values["Emphasis"] = "No norm"
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
