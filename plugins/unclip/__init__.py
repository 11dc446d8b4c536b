"""The unCLIP families: models conditioned on CLIP *image* embeddings, with ``txt2img``,
``variations`` and ``blend`` (Midjourney's ``/blend``).

Both are driven by the same :class:`aipaint.Pipeline` as every family (``txt2img``,
``variations(image)``, ``blend(images, weights)``), and read the ``unclip`` options
(:class:`aipaint_plugins.unclip.options.UnCLIPOptions`: prior steps and CFG scale, Karlo's
super-resolution steps, Stable unCLIP's noise level).

* ``unclip`` (DALL·E 2 style; diffusers' UnCLIP / Karlo): a prior from text to a CLIP image
  embedding, a pixel decoder conditioned on it, and ×4 super-resolution. It does not fit the
  latent loop, so its model runs its own (:mod:`aipaint_plugins.unclip.loop`). The text model
  and the image-variations model share the decoder; the image encoder comes from the
  variations folder (``image_encoder=`` load option, or the zoo card's ``image_encoder``)::

      pipe = aipaint.load("path/karlo-v1-alpha", image_encoder="path/karlo-v1-alpha-image-variations")

* ``stable-unclip`` (``stabilityai/stable-diffusion-2-1-unclip``, ``-unclip-small``): SD 2.1
  with a noise-augmented CLIP image embedding as the UNet's class label, in the core's latent
  loop (:mod:`aipaint_plugins.unclip.stable_labels`). Text-to-image needs a prior (``prior=``
  load option, the folder's own, or the card's ``prior``: Karlo's, for the ViT-L model)::

      pipe = aipaint.load("path/stable-diffusion-2-1-unclip-small", prior="path/karlo-v1-alpha")
      pipe.variations("fox.png", batch_size=4, options={"unclip": {"noise_level": 100}})
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aipaint import hookimpl
from aipaint.api.options import OptionGroup
from aipaint.errors import ModelLoadError, UnsupportedFeature
from aipaint.models.family import LoadOptions, ModelFamily, ModelSource

if TYPE_CHECKING:
    from aipaint_plugins.unclip.model import UnCLIPModel
    from aipaint_plugins.unclip.stable_model import StableUnCLIPModel

FOLDER_CLASSES = ("UnCLIPPipeline", "UnCLIPImageVariationPipeline")
STABLE_FOLDER_CLASSES = ("StableUnCLIPImg2ImgPipeline", "StableUnCLIPPipeline")


def companion_folder(source: ModelSource, options: LoadOptions, key: str) -> Path | None:
    """The folder a model takes one more component from: the ``key=`` load option (a local
    folder), else the zoo card's ``key`` entry (a hub repo, optionally narrowed by ``patterns``)."""
    explicit = options.extra.get(key)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"no such {key.replace('_', '-')} folder: {path}")
        return path
    entry = (source.card or {}).get(key)
    if entry:
        from aipaint.models import zoo

        return zoo.download_from_hub(entry["repo"], patterns=entry.get("patterns"))
    return None


def _check_torch_folder(family: str, source: ModelSource, options: LoadOptions) -> None:
    if options.runtime != "torch":
        raise UnsupportedFeature(f"{family} runs on the torch runtime only, not {options.runtime!r}")
    if source.kind != "folder":
        raise ModelLoadError(f"{source.path.name}: {family} models load from diffusers folders, not single files")


class UnCLIP(ModelFamily):
    name = "unclip"
    load_options = ("image_encoder",)
    aliases = ("karlo", "dalle2", "dall-e-2")
    base_models = (r"karlo",)
    description = "unCLIP / Karlo (DALL·E 2 style): text→image-embedding prior, image-embedding decoder; variations, blend"
    default_size = (256, 256)

    def identify(self, source: ModelSource) -> bool:
        return source.kind == "folder" and source.model_index().get("_class_name") in FOLDER_CLASSES

    def load(self, source: ModelSource, options: LoadOptions) -> UnCLIPModel:
        import torch
        from aipaint_plugins.unclip.model import TEXT_PIPELINE, UnCLIPModel, load_folder

        _check_torch_folder("unCLIP", source, options)
        dtype = getattr(torch, options.dtype)
        safetensors_only = None if source.allow_pickle else True
        parts = load_folder(source.path, dtype, safetensors_only)
        image_folder = companion_folder(source, options, "image_encoder") if parts["kind"] == TEXT_PIPELINE else None
        if image_folder is not None:
            images = load_folder(image_folder, dtype, safetensors_only)
            if images["kind"] == TEXT_PIPELINE:
                raise ModelLoadError(f"{image_folder} has no image encoder: image_encoder= takes an image-variations folder")
            parts["image_encoder"], parts["feature_extractor"] = images["image_encoder"], images["feature_extractor"]
        parts.pop("kind")
        model = UnCLIPModel(family=self.name, name=source.name, source_path=source.path, device=options.device, dtype=dtype,
                            **parts)
        for module in model.modules().values():
            module.to(options.device).eval().requires_grad_(False)
        return model


class StableUnCLIP(ModelFamily):
    name = "stable-unclip"
    load_options = ("prior", "image_encoder")
    aliases = ("stable-unclip-2.1", "sd21-unclip")
    base_models = (r"2\.1.?unclip", r"stable-diffusion-2-1-unclip", r"unclip-2")
    description = ("Stable unCLIP (SD 2.1 conditioned on a noise-augmented CLIP image embedding): variations, blend; "
                   "txt2img with a prior")
    default_size = (768, 768)

    def identify(self, source: ModelSource) -> bool:
        return source.kind == "folder" and source.model_index().get("_class_name") in STABLE_FOLDER_CLASSES

    def load(self, source: ModelSource, options: LoadOptions) -> StableUnCLIPModel:
        import torch
        from aipaint_plugins.unclip.stable_model import (
            StableUnCLIPModel,
            default_settings,
            load_folder,
            load_image_encoder,
            load_prior,
        )

        _check_torch_folder("Stable unCLIP", source, options)
        dtype = getattr(torch, options.dtype)
        safetensors_only = None if source.allow_pickle else True
        parts = load_folder(source.path, dtype, safetensors_only)
        dim = int(parts["image_normalizer"].config.embedding_dim)
        prior_folder = self._companion(source, options, "prior", parts)
        if prior_folder is not None:
            prior = load_prior(prior_folder, dtype, safetensors_only)
            _check_dim(f"the prior of {prior_folder}", prior["prior"].config.embedding_dim, source.name, dim,
                       "Karlo's prior (CLIP ViT-L, 768) fits stable-diffusion-2-1-unclip-small, not the ViT-H model")
            parts.update(prior)
        encoder_folder = self._companion(source, options, "image_encoder", parts)
        if encoder_folder is not None:
            encoder = load_image_encoder(encoder_folder, dtype, safetensors_only)
            _check_dim(f"the image encoder of {encoder_folder}", encoder["image_encoder"].config.projection_dim,
                       source.name, dim, "take the image encoder of the same Stable unCLIP model (-small: ViT-L, the other: ViT-H)")
            parts.update(encoder)
        unet, vae = parts["unet"], parts["vae"]
        model = StableUnCLIPModel(family=self.name, name=source.name, source_path=source.path, device=options.device,
                                  dtype=dtype, defaults=default_settings(unet, vae), **parts)
        for module in model.modules().values():
            module.to(options.device).eval().requires_grad_(False)
        return model

    @staticmethod
    def _companion(source: ModelSource, options: LoadOptions, key: str, parts: dict[str, Any]) -> Path | None:
        """An explicit ``key=`` option replaces the folder's own component; the card's entry only fills a missing one."""
        if options.extra.get(key) or key not in parts:
            return companion_folder(source, options, key)
        return None


def _check_dim(what: str, size: int, model: str, expected: int, hint: str) -> None:
    if int(size) != expected:
        raise ModelLoadError(
            f"{what} works with {size}-dimensional CLIP embeddings, but {model} takes {expected}-dimensional ones; {hint}"
        )


@hookimpl
def register_options(register: Callable[[type[OptionGroup]], None]) -> None:
    from aipaint_plugins.unclip.options import UnCLIPOptions

    register(UnCLIPOptions)


@hookimpl
def register_models(register: Callable[[ModelFamily], None]) -> None:
    register(UnCLIP())
    register(StableUnCLIP())
