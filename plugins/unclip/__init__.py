"""The unCLIP family (DALL·E 2 style; diffusers' UnCLIP / Karlo): a prior from text to a
CLIP image embedding, a decoder conditioned on image embeddings, and ×4 super-resolution.

unCLIP does not fit the latent loop, so its models name their own pipeline class
(:class:`aipaint_plugins.unclip.pipeline.UnCLIPPipeline`), which offers ``txt2img``,
``variations`` and ``blend``. The text model and the image-variations model share the
decoder; the image encoder comes from the variations folder (``image_encoder=`` load
option, or the zoo card's ``image_encoder``)::

    pipe = aipaint.load("path/karlo-v1-alpha", image_encoder="path/karlo-v1-alpha-image-variations")
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aipaint import hookimpl
from aipaint.errors import ModelLoadError, UnsupportedFeature
from aipaint.families import LoadOptions, ModelFamily, ModelSource

if TYPE_CHECKING:
    from aipaint_plugins.unclip.model import UnCLIPModel

FOLDER_CLASSES = ("UnCLIPPipeline", "UnCLIPImageVariationPipeline")


class UnCLIP(ModelFamily):
    name = "unclip"
    aliases = ("karlo", "dalle2", "dall-e-2")
    description = "unCLIP / Karlo (DALL·E 2 style): text→image-embedding prior, image-embedding decoder; variations, blend"
    default_size = (256, 256)

    def identify(self, source: ModelSource) -> bool:
        return source.kind == "folder" and source.model_index().get("_class_name") in FOLDER_CLASSES

    def load(self, source: ModelSource, options: LoadOptions) -> UnCLIPModel:
        import torch
        from aipaint_plugins.unclip.model import TEXT_PIPELINE, UnCLIPModel, load_folder

        if options.runtime != "torch":
            raise UnsupportedFeature(f"unCLIP runs on the torch runtime only, not {options.runtime!r}")
        if source.kind != "folder":
            raise ModelLoadError(f"{source.path.name}: unCLIP models load from diffusers folders, not single files")
        dtype = getattr(torch, options.dtype)
        safetensors_only = None if source.allow_pickle else True
        parts = load_folder(source.path, dtype, safetensors_only)
        image_folder = self._image_encoder_folder(source, options) if parts["kind"] == TEXT_PIPELINE else None
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

    @staticmethod
    def _image_encoder_folder(source: ModelSource, options: LoadOptions) -> Path | None:
        explicit = options.extra.get("image_encoder")
        if explicit:
            path = Path(explicit).expanduser()
            if not path.is_dir():
                raise ModelLoadError(f"no such image-encoder folder: {path}")
            return path
        entry = (source.card or {}).get("image_encoder")
        if entry:
            from aipaint import zoo

            return zoo.download_from_hub(entry["repo"])
        return None


@hookimpl
def register_models(register: Callable[[ModelFamily], None]) -> None:
    register(UnCLIP())
