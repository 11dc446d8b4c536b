"""The Stable Diffusion 3 / 3.5 family (SD 3 Medium, SD 3.5 Large, Large Turbo and Medium).

SD 3 is a latent flow-matching model: an MMDiT (diffusers' ``SD3Transformer2DModel``) over a
16-channel VAE with a shift factor, conditioned on CLIP ViT-L and OpenCLIP bigG (penultimate
layers side by side, zero-padded to T5's width, plus both pooled embeddings) followed on the
sequence axis by T5-XXL's embeddings — or zeros where T5 is left out. It runs in the core's
latent loop: the samplers' flow forms (``aipaint.engine.plans.FlowPlan``) step the model's
shifted sigmas; this plugin teaches the loop the rest (see ``model.py``).

Loads diffusers folders, and single-file checkpoints offline with the configs in
``zoo/configs/sd3-medium``, ``sd3.5-large`` and ``sd3.5-medium``. ``aipaint.load(..., t5=False)``
leaves T5-XXL out (about 9.5 GB less at fp16, as diffusers' ``text_encoder_3=None``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aipaint import hookimpl
from aipaint.api.options import OptionGroup
from aipaint.errors import ModelLoadError
from aipaint.models.family import LoadOptions, ModelFamily, ModelSource

if TYPE_CHECKING:
    import torch
    from aipaint_plugins.sd3.model import SD3Model

PIPELINE_CLASSES = {"StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"}
# The MMDiT's first joint block, with or without Stability's "model.diffusion_model." prefix.
MMDIT_KEYS = (
    "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
    "joint_blocks.0.context_block.adaLN_modulation.1.bias",
)
CLIP_L_KEY = "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight"
CLIP_G_KEY = "text_encoders.clip_g.transformer.text_model.embeddings.position_embedding.weight"
T5_KEY = "text_encoders.t5xxl.transformer.shared.weight"
T5_TOKENIZER_REPO = "google/t5-v1_1-xxl"  # SD 3's tokenizer_3 is this tokenizer (SentencePiece, 32k)


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


def config_for_keys(keys: set[str], pos_embed_tokens: int | None) -> str:
    """Which zoo config describes a single file: SD 3.5 Large has 38 joint blocks; SD 3.5
    Medium's position table is 384² (SD 3 Medium's 192²)."""
    if any(k.endswith("joint_blocks.37.x_block.mlp.fc1.weight") for k in keys):
        return "sd3.5-large"
    if pos_embed_tokens == 384 * 384:
        return "sd3.5-medium"
    return "sd3-medium"


class StableDiffusion3(ModelFamily):
    name = "sd3"
    load_options = ("t5", "text_encoder_device")
    aliases = ("sd3.5", "sd35", "sd-3", "stable-diffusion-3", "stable-diffusion-3.5", "sd3-medium", "sd3.5-large", "sd3.5-medium")
    # Civitai's "SD 3", "SD 3.5", "SD 3.5 Large", "SD 3.5 Large Turbo", "SD 3.5 Medium"; hub ids.
    base_models = (r"\bsd ?3(\.5)?\b", r"stable-diffusion-3", r"\bsd3")
    air_ecosystem = "sd3"
    description = "Stable Diffusion 3 / 3.5 (MMDiT; CLIP-L, CLIP-G and optional T5-XXL; flow matching)"
    default_size = (1024, 1024)

    def identify(self, source: ModelSource) -> bool:
        if source.kind == "folder":
            return source.model_index().get("_class_name") in PIPELINE_CLASSES
        if source.path.suffix != ".safetensors":
            return False
        keys = set(source.checkpoint_keys())
        return any(key in keys for key in MMDIT_KEYS)

    def load(self, source: ModelSource, options: LoadOptions) -> SD3Model:
        use_t5(options), text_encoder_device(options)  # settings checked before anything is read
        model = self._load_folder(source, options) if source.kind == "folder" else self._load_file(source, options)
        for module in model.modules().values():
            module.eval().requires_grad_(False)
        return model

    def _load_folder(self, source: ModelSource, options: LoadOptions) -> SD3Model:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        path = source.path
        index = source.model_index()
        for part in ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"):
            if not (path / part).is_dir():
                raise ModelLoadError(f"{path} is not an SD 3 folder: it has no {part}/ sub-folder")
        with_t5 = use_t5(options) and bool(index.get("text_encoder_3") and index["text_encoder_3"][0])
        with_t5 = with_t5 and (path / "text_encoder_3").is_dir()
        dtype = _torch_dtype(options.dtype)
        safetensors_only = None if source.allow_pickle else True
        te_options: dict[str, Any] = {"dtype": dtype, "use_safetensors": safetensors_only, "local_files_only": True}
        try:
            transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype, use_safetensors=safetensors_only)
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, use_safetensors=safetensors_only)
            text_encoder = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", **te_options)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **te_options)
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
            tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True)
            text_encoder_3 = tokenizer_3 = None
            if with_t5:
                from transformers import AutoTokenizer, T5EncoderModel

                text_encoder_3 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", **te_options)
                tokenizer_3 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_3", local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load the SD 3 folder {path}: {exc}") from exc
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        components = {
            "transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2,
            "text_encoder_3": text_encoder_3, "tokenizer_3": tokenizer_3,
        }
        weights = path / "transformer" / "diffusion_pytorch_model.safetensors"
        return self._assemble(source, options, components, scheduler_config, weights)

    def _load_file(self, source: ModelSource, options: LoadOptions) -> SD3Model:
        from diffusers import StableDiffusion3Pipeline
        from safetensors import safe_open

        keys = set(source.checkpoint_keys())
        pos_tokens = None
        for key in ("model.diffusion_model.pos_embed", "pos_embed"):
            if key in keys:
                with safe_open(str(source.path), framework="pt") as f:
                    pos_tokens = int(f.get_slice(key).get_shape()[1])
                break
        card_config = (source.card or {}).get("config")
        config = options.config or default_config(
            card_config.removeprefix("configs/") if card_config else config_for_keys(keys, pos_tokens)
        )
        if CLIP_L_KEY not in keys or CLIP_G_KEY not in keys:
            raise ModelLoadError(
                f"{source.path.name} holds the SD 3 MMDiT without its CLIP text encoders (Stability publishes such "
                "files, e.g. sd3.5_large.safetensors, beside a text_encoders/ folder); load the model's diffusers "
                "folder (its zoo card) or a file that includes the CLIPs (e.g. sd3_medium_incl_clips.safetensors)"
            )
        with_t5 = T5_KEY in keys and use_t5(options)
        extra: dict[str, Any] = {"tokenizer": clip_tokenizer(config, "tokenizer"), "tokenizer_2": clip_tokenizer(config, "tokenizer_2")}
        if with_t5:
            extra["tokenizer_3"] = t5_tokenizer(config)
        else:
            extra.update(text_encoder_3=None, tokenizer_3=None)
        try:
            pipe = StableDiffusion3Pipeline.from_single_file(
                str(source.path), config=str(config), local_files_only=True, torch_dtype=_torch_dtype(options.dtype), **extra
            )
        except Exception as exc:
            raise ModelLoadError(f"could not load {source.path.name} as an SD 3 checkpoint with the config {config}: {exc}") from exc
        components = {name: getattr(pipe, name, None) for name in (
            "transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")}
        from aipaint.models.loading import refuse_missing_weights

        refuse_missing_weights(source.path, config, {name: components[name] for name in
                               ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")}, "SD 3")
        return self._assemble(source, options, components, dict(pipe.scheduler.config), source.path)

    def _assemble(
        self,
        source: ModelSource,
        options: LoadOptions,
        components: dict[str, Any],
        scheduler_config: dict[str, Any],
        hash_path: Path,
    ) -> SD3Model:
        from aipaint_plugins.sd3.model import SD3Model

        from aipaint.models.latent import ModelDefaults

        text_device = text_encoder_device(options)

        def place(module: Any, device: str = options.device) -> Any:
            return module.to(device) if module is not None else None

        return SD3Model(
            family=self.name,
            name=source.name,
            unet=place(components["transformer"]),
            vae=place(components["vae"]),
            text_encoder=place(components["text_encoder"], text_device),
            tokenizer=components["tokenizer"],
            text_encoder_2=place(components["text_encoder_2"], text_device),
            tokenizer_2=components["tokenizer_2"],
            text_encoder_3=place(components["text_encoder_3"], text_device),
            tokenizer_3=components["tokenizer_3"],
            scheduler_config=scheduler_config,
            source_path=source.path,
            hash_path=hash_path if hash_path.is_file() else None,
            defaults=ModelDefaults(
                width=self.default_size[0], height=self.default_size[1], steps=28, cfg_scale=5.0, sampler="Euler"
            ),
            device=options.device,
            dtype=_torch_dtype(options.dtype),
        )


def use_t5(options: LoadOptions) -> bool:
    value = options.extra.get("t5", True)
    if not isinstance(value, bool):
        from aipaint.errors import InvalidParameter

        raise InvalidParameter("t5", value, "true (load T5-XXL when the model has it) or false (leave it out)")
    return value


def text_encoder_device(options: LoadOptions) -> str:
    """Where the text encoders live: the model's device, or ``text_encoder_device="cpu"`` to keep
    CLIP-L, CLIP-G and T5-XXL (about 11 GB at fp16) in system memory; they run once per prompt
    and their outputs are moved to the model's device."""
    value = options.extra.get("text_encoder_device", options.device)
    if not isinstance(value, str) or not value:
        from aipaint.errors import InvalidParameter

        raise InvalidParameter("text_encoder_device", value, "a torch device name, e.g. 'cpu' or 'cuda:1'")
    return value


def default_config(name: str) -> Path:
    from aipaint.models.zoo import zoo_root

    return zoo_root() / "configs" / name


def clip_tokenizer(config: Path, sub: str) -> Any:
    """A CLIP tokenizer from the config folder, else the SDXL config's (SD 3 uses the same two:
    ``tokenizer`` pads with ``<|endoftext|>``, ``tokenizer_2`` with ``!``), so SD 3's configs need
    not ship another 7 MB of vocabulary."""
    from transformers import CLIPTokenizer

    folder = Path(config) / sub
    if not (folder / "tokenizer_config.json").is_file():
        folder = default_config("sdxl-base") / sub
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def t5_tokenizer(config: Path) -> Any:
    """T5-XXL's tokenizer: the config folder's ``tokenizer_3`` if it has one, else google's
    ``t5-v1_1-xxl`` from the Hugging Face cache or hub (aipaint ships no SentencePiece model)."""
    from transformers import AutoTokenizer

    folder = Path(config) / "tokenizer_3"
    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    try:
        return AutoTokenizer.from_pretrained(T5_TOKENIZER_REPO)
    except Exception as exc:  # offline, or the hub refused
        raise ModelLoadError(
            f"the file has T5-XXL weights but no T5 tokenizer is at hand ({T5_TOKENIZER_REPO} could not be read: {exc}); "
            "connect once to cache it, pass config= a folder with tokenizer_3/, or load with t5=False"
        ) from exc


def options_from_png(args: argparse.Namespace, png_params: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The "Shift" a ``--from-png`` image recorded (an explicit ``--option sd3.shift=…`` still wins)."""
    from aipaint_plugins.sd3.options import INFOTEXT_KEY

    recorded = png_params.get(INFOTEXT_KEY, "").strip()
    return {"sd3": {"shift": recorded}} if recorded else {}


@hookimpl
def register_options(register: Callable[[type[OptionGroup]], None]) -> None:
    from aipaint_plugins.sd3.options import SD3Options

    register(SD3Options)


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint.cli.api import add_request_options_builder, generation_parsers

    for parser in generation_parsers(subparsers):
        add_request_options_builder(parser, options_from_png)


@hookimpl
def register_models(register: Callable[[ModelFamily], None]) -> None:
    register(StableDiffusion3())
