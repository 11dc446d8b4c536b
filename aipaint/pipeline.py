"""The user-facing pipeline: load a model once, then generate, whatever the model's family.

Every mode builds one :class:`aipaint.api.request.GenerationRequest` and hands it to
:meth:`Pipeline.generate`, which checks it once (typed plugin options, the family's
capabilities) and asks the model to run it. Latent models run through
:func:`aipaint.engine.run.generate`; families with another loop (DeepFloyd IF's pixel
cascade, Karlo's unCLIP) implement :meth:`aipaint.models.family.GenerativeModel.generate`.
Importing this module imports torch (through the engine); ``import aipaint`` does not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aipaint.api.request import GenerationRequest
from aipaint.api.result import Result
from aipaint.engine import run as engine
from aipaint.models.family import GenerativeModel, require_capabilities
from aipaint.models.latent import LatentDiffusionModel
from aipaint.plugin.host import PluginHost, default_host

Progress = Callable[[int, int], None]


class Pipeline:
    """A loaded model plus the plugins that can act on it.

    >>> import aipaint
    >>> pipe = aipaint.load()                      # the embedded model, offline
    >>> result = pipe.txt2img("a big red circle on the left, on a white background", seed=1)
    >>> result.save("circle.png")
    """

    def __init__(self, model: GenerativeModel, host: PluginHost | None = None) -> None:
        self.model = model
        self.host = host or default_host()

    @classmethod
    def load(cls, source: str | Path | None = None, *, host: PluginHost | None = None, **options: Any) -> Pipeline:
        """Load a model: a zoo id, a diffusers folder, a single-file checkpoint or a hub id.

        With no source, the embedded default model. Options: ``family``, ``device``,
        ``dtype``, ``runtime``, ``allow_pickle`` (default False), ``config``, and the family's
        own (e.g. IF's ``stage2``, unCLIP's ``prior``).
        """
        from aipaint.models.loading import load_model

        host = host or default_host()
        return cls(load_model(source, host=host, **options), host)

    # --- modes: each builds a request --------------------------------------------------
    def txt2img(self, prompt: str, negative_prompt: str = "", *, progress: Progress | None = None,
                preview: Callable[[Any], None] | None = None, **params: Any) -> Result:
        """Text to image. Parameters as in :class:`aipaint.api.request.GenerationRequest`."""
        request = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, **params)
        return self.generate(request, progress=progress, preview=preview)

    def img2img(self, image: Any, prompt: str, negative_prompt: str = "", *, denoising_strength: float = 0.75,
                resize_mode: str = "just resize", progress: Progress | None = None,
                preview: Callable[[Any], None] | None = None, **params: Any) -> Result:
        """Image to image: ``image`` (PIL image, array or path) noised to ``denoising_strength``
        and denoised towards the prompt. See :mod:`aipaint.engine.modes`."""
        request = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, init_image=image,
                                    denoising_strength=denoising_strength, resize_mode=resize_mode, **params)
        return self.generate(request, progress=progress, preview=preview)

    def inpaint(self, image: Any, mask: Any, prompt: str, negative_prompt: str = "", *, denoising_strength: float = 0.75,
                mask_blur: int = 4, inpainting_fill: str = "original", inpaint_full_res: bool = False,
                inpaint_full_res_padding: int = 32, inpainting_mask_invert: bool = False,
                progress: Progress | None = None, preview: Callable[[Any], None] | None = None, **params: Any) -> Result:
        """Repaint the white part of ``mask``; pixels outside the blurred mask stay exactly as they were."""
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative_prompt, init_image=image, mask=mask,
            denoising_strength=denoising_strength, mask_blur=mask_blur, inpainting_fill=inpainting_fill,
            inpaint_full_res=inpaint_full_res, inpaint_full_res_padding=inpaint_full_res_padding,
            inpainting_mask_invert=inpainting_mask_invert, **params,
        )
        return self.generate(request, progress=progress, preview=preview)

    def outpaint(self, image: Any, prompt: str, negative_prompt: str = "", *, left: int = 0, top: int = 0,
                 right: int = 0, bottom: int = 0, fill: str = "edge", mask_blur: int = 8,
                 denoising_strength: float = 1.0, progress: Progress | None = None,
                 preview: Callable[[Any], None] | None = None, **params: Any) -> Result:
        """Extend ``image`` by the given pixels on each side and paint the new area; the
        original pixels stay unchanged. ``fill``: ``edge``, ``blur`` or ``noise``. The same as
        :meth:`generate` with the request fields ``outpaint_left`` … ``outpaint_fill``."""
        from aipaint.engine.modes import Extension

        Extension(left, top, right, bottom)  # at least one side, whole pixels: said here, not taken as img2img
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative_prompt, init_image=image,
            denoising_strength=denoising_strength, mask_blur=mask_blur, outpaint_left=left, outpaint_top=top,
            outpaint_right=right, outpaint_bottom=bottom, outpaint_fill=fill, **params,
        )
        return self.generate(request, progress=progress, preview=preview)

    def variations(self, image: Any, prompt: str = "", negative_prompt: str = "", *, progress: Progress | None = None,
                   preview: Callable[[Any], None] | None = None, **params: Any) -> Result:
        """Pictures like ``image`` (its CLIP image embedding in place of a text prompt), for
        families that can (unCLIP). ``batch_size`` sets how many."""
        request = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, image_prompts=(image,), **params)
        return self.generate(request, progress=progress, preview=preview)

    def blend(self, images: Sequence[Any], weights: Sequence[float] | None = None, prompt: str = "",
              negative_prompt: str = "", *, progress: Progress | None = None,
              preview: Callable[[Any], None] | None = None, **params: Any) -> Result:
        """A picture mixing 2–5 ``images`` (their CLIP image embeddings interpolated by
        ``weights``, equal by default), for families that can (unCLIP)."""
        if not 2 <= len(images) <= 5:
            from aipaint.errors import InvalidParameter

            raise InvalidParameter("image_prompts", f"<{len(images)} images>", "a blend mixes 2 to 5 images",
                                   "for one image, ask for variations")
        request = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, image_prompts=tuple(images),
                                    image_prompt_weights=tuple(weights) if weights is not None else (), **params)
        return self.generate(request, progress=progress, preview=preview)

    # --- the one entry point -----------------------------------------------------------
    def check(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` checked against what is loaded: its plugin options typed (an unknown
        option names the close matches), its sampler and schedule known, and every feature
        it asks for one the model's family has."""
        request = request.with_typed_options(self.host.registry.options)
        if request.sampler is not None:
            self.host.registry.samplers.get(request.sampler).check_schedule(request.schedule or "Automatic")
        require_capabilities(self.model, request)
        return request

    def generate(self, request: GenerationRequest, progress: Progress | None = None, *,
                 preview: Callable[[Any], None] | None = None) -> Result:
        """Run ``request``: ``progress(done, total)`` after each step, ``preview(step)`` with a
        :class:`aipaint.engine.preview.StepPreview` where the family supports it."""
        request = self.check(request)
        if isinstance(self.model, LatentDiffusionModel):
            return engine.generate(self.model, request, host=self.host, progress=progress, preview=preview)
        return self.model.generate(request, host=self.host, progress=progress, preview=preview)

    def __repr__(self) -> str:
        return f"<aipaint.Pipeline {self.model!r}>"
