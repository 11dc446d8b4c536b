"""A GAN model folder, and the loaded model that the pipeline drives.

A folder holds ``gan_config.json`` (the architecture, the vocabulary of a conditioned model,
how it was trained), ``generator.safetensors``, ``critic.safetensors`` (only training needs it)
and ``training.json`` (the loss curves). Weights are read with safetensors only: a GAN folder
never needs pickle.

Sampling is one forward pass of the generator: the seed's noise vector (the core's seeds,
variation seed and strength) and the caption's bag of words in, a 32×32 picture out. There are
no steps, no sampler and no CFG scale; the request fields that set them are refused, not ignored.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from aipaint_plugins.gan.networks import IMAGE_SIZE, Critic, Generator, Vocabulary
from aipaint_plugins.gan.options import GANOptions

from aipaint import __version__
from aipaint.api.result import Result
from aipaint.engine.noise import request_noise, seed_infotext
from aipaint.engine.run import job_scope, make_generators
from aipaint.errors import AipaintWarning, InvalidParameter, ModelLoadError, UnsupportedFeature
from aipaint.infotext import build_params
from aipaint.models.family import GenerativeModel, refuse_unused
from aipaint.models.latent import ModelDefaults

if TYPE_CHECKING:
    from aipaint.api.request import GenerationRequest
    from aipaint.plugin.host import PluginHost

FORMAT = "aipaint-gan"
FORMAT_VERSION = 1
CONFIG_FILE = "gan_config.json"
GENERATOR_FILE = "generator.safetensors"
CRITIC_FILE = "critic.safetensors"
TRAINING_FILE = "training.json"
LOSSES = ("wgan", "wgan-gp")
CONDITIONS = ("none", "words")
#: Request fields of the diffusion loop that a one-pass generator has no use for.
UNUSED_FIELDS = ("negative_prompt", "steps", "cfg_scale", "sampler", "schedule", "clip_skip", "guidance_rescale",
                 "skip_early_cfg", "emphasis", "seed_resize_from_w", "seed_resize_from_h")


@dataclass(frozen=True)
class GANConfig:
    """What a folder's ``gan_config.json`` says: enough to rebuild both networks."""

    z_dim: int = 64
    channels: int = 32
    embed_dim: int = 32
    condition: str = "words"
    vocabulary: tuple[str, ...] = ()
    loss: str = "wgan-gp"
    image_size: int = IMAGE_SIZE

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self), "vocabulary": list(self.vocabulary)}

    @classmethod
    def from_json(cls, data: Any, where: Path) -> GANConfig:
        """The config in ``data``; :class:`ModelLoadError` naming the first field that is wrong."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ModelLoadError(f"{where} is not an aipaint GAN config (it needs \"format\": \"{FORMAT}\")")
        if data.get("format_version") != FORMAT_VERSION:
            raise ModelLoadError(f"{where}: format_version {data.get('format_version')!r} is not one this aipaint "
                                 f"reads ({FORMAT_VERSION})")
        checks: dict[str, Callable[[Any], bool]] = {
            "z_dim": lambda v: type(v) is int and 1 <= v <= 4096,
            "channels": lambda v: type(v) is int and 1 <= v <= 1024,
            "embed_dim": lambda v: type(v) is int and 1 <= v <= 4096,
            "condition": lambda v: v in CONDITIONS,
            "vocabulary": lambda v: isinstance(v, (list, tuple)) and len(v) <= 10000 and all(isinstance(w, str) for w in v),
            "loss": lambda v: v in LOSSES,
            "image_size": lambda v: v == IMAGE_SIZE,
        }
        values = {}
        for name, ok in checks.items():
            value = data.get(name, getattr(cls, name))
            if not ok(value):
                raise ModelLoadError(f"{where}: {name} {value!r} is not valid")
            values[name] = tuple(value) if name == "vocabulary" else value
        config = cls(**values)
        if config.condition == "words" and not config.vocabulary:
            raise ModelLoadError(f"{where}: a word-conditioned GAN needs its vocabulary")
        return config

    @property
    def vocab(self) -> Vocabulary | None:
        return Vocabulary(self.vocabulary) if self.condition == "words" else None

    def build_generator(self) -> Generator:
        size = len(self.vocabulary) if self.condition == "words" else 0
        return Generator(self.z_dim, self.channels, size, self.embed_dim)

    def build_critic(self) -> Critic:
        return Critic(self.channels, len(self.vocabulary) if self.condition == "words" else 0)


def is_gan_folder(path: Path) -> bool:
    config = path / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("format") == FORMAT
    except (ValueError, OSError, AttributeError):
        return False


def read_config(folder: Path) -> GANConfig:
    path = folder / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON ({exc})") from exc
    return GANConfig.from_json(data, path)


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """``path``'s tensors into ``module``, every key present and no key left over."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelLoadError(f"{path.parent} has no {path.name}")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelLoadError(f"{path} is not a readable safetensors file: {exc}") from exc
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{path} does not fit the network its gan_config.json describes: "
                             f"{str(exc).splitlines()[0]} ...") from exc


class GANModel(GenerativeModel):
    """A trained generator, driven by the core pipeline like every family: it can do ``txt2img`` only."""

    capabilities = frozenset({"txt2img"})

    def __init__(self, *, family: str, name: str, config: GANConfig, generator: Generator, source_path: Path | None,
                 device: str = "cpu", card: dict[str, Any] | None = None) -> None:
        self.family = family
        self.name = name
        self.config = config
        self.generator = generator.eval().requires_grad_(False)
        self.source_path = source_path
        self.device = torch.device(device)
        self.dtype = next(generator.parameters()).dtype
        self.card = card or {}
        self.runtime = "torch"
        self.defaults = ModelDefaults(width=config.image_size, height=config.image_size, steps=1, cfg_scale=1.0,
                                      sampler="", schedule="")

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"generator": self.generator}

    def missing_hint(self, feature: str) -> str:
        return "A GAN maps noise to a picture in one pass; it has no noisy picture to start from" \
            if feature in ("img2img", "inpaint", "outpaint") else ""

    def generate(self, request: GenerationRequest, *, host: PluginHost,
                 progress: Callable[[int, int], None] | None = None, preview: Callable[[Any], None] | None = None) -> Result:
        """1. check the request; 2. draw each image's noise vector from its seed; 3. encode the caption's
        words; 4. one generator pass for the batch (batch norm in eval mode, so an image does not depend on
        the others in its batch)."""
        refuse_unused(self, request, UNUSED_FIELDS)
        size = self.config.image_size
        for name in ("width", "height"):
            value = getattr(request, name)
            if value is not None and value != size:
                raise InvalidParameter(name, value, f"must be {size} (the GAN's only size) or unset")
        options = request.option(GANOptions)
        vocab = self.config.vocab
        unknown: list[str] = []
        if vocab is None and request.prompt.strip():
            raise UnsupportedFeature(f"{self.family} model {self.name!r} is unconditional: it cannot follow a prompt "
                                     f"(given {request.prompt!r}); pass an empty prompt")
        if vocab is not None:
            _, unknown = vocab.split(request.prompt)
            if unknown:
                warnings.warn(f"{self.name}: words the GAN was never trained on are ignored: {', '.join(unknown)}",
                              AipaintWarning,
                              stacklevel=2)
        request = request.with_seed()
        started = time.perf_counter()
        generators = make_generators(request.seeds)
        with job_scope(self), torch.inference_mode():
            # laid out as (1, z_dim, 1): the core's slerp for variation seeds normalises over dimension 1
            z = request_noise(request, (1, self.config.z_dim, 1), generators, 1).flatten(1) * options.truncation
            z = z.to(self.device, next(self.generator.parameters()).dtype)
            condition = None
            if vocab is not None:
                condition = vocab.encode([request.prompt] * len(request.seeds)).to(z.device, z.dtype)
            images = self.generator(z, condition)
        if progress is not None:
            progress(1, 1)
        pictures = _to_pictures(images)
        infotexts = [self._infotext(request, seed, options, unknown) for seed in request.seeds]
        return Result(images=pictures, seeds=list(request.seeds), infotexts=infotexts, request=request,
                      timings={"total": time.perf_counter() - started})

    def _infotext(self, request: GenerationRequest, seed: int, options: GANOptions, unknown: list[str]) -> str:
        from aipaint.infotext import Infotext

        values: dict[str, Any] = {
            "Seed": seed,
            "Size": f"{self.config.image_size}x{self.config.image_size}",
            "Model": self.name,
            **seed_infotext(request, seed),
            "GAN loss": self.config.loss,
            "GAN condition": self.config.condition,
            "GAN truncation": options.truncation if options.truncation != 1.0 else None,
            "GAN unknown words": " ".join(unknown) or None,
            "Version": f"aipaint {__version__}",
        }
        return Infotext(request.prompt, "", build_params(values)).to_text()

    def __repr__(self) -> str:
        return f"<GANModel {self.name!r} condition={self.config.condition} loss={self.config.loss}>"


def _to_pictures(images: torch.Tensor) -> list[Any]:
    from PIL import Image

    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, "RGB") for a in array]


def load_gan(folder: Path, *, family: str, name: str, device: str = "cpu", dtype: str = "float32",
             card: dict[str, Any] | None = None) -> GANModel:
    """The generator of a GAN folder, ready to sample."""
    config = read_config(folder)
    generator = config.build_generator()
    load_weights(generator, folder / GENERATOR_FILE)
    generator.to(device=device, dtype=getattr(torch, dtype))
    return GANModel(family=family, name=name, config=config, generator=generator, source_path=folder, device=device,
                    card=card)
