"""Finding and loading ControlNet models.

A unit names its model as

* a **zoo id** (a card with family ``"controlnet"``, e.g. ``shapes-tiny-controlnet-layout``);
* a **name in the ControlNet folder** (``$AIPAINT_CONTROLNET_DIR``, else
  ``$AIPAINT_HOME/controlnet``, i.e. ``~/.aipaint/controlnet``): a diffusers folder
  (``<name>/config.json`` + weights) or a single file (``<name>.safetensors``), found
  anywhere below the folder by name, case-insensitively, as A1111 does. Names come from
  users and from PNGs, so they never resolve outside the folder: absolute paths, ``..``
  and symbolic links leading out are refused before anything is opened;
* an explicit :class:`pathlib.Path` (API callers; the CLI turns an existing path into one);
* a loaded ``diffusers.ControlNetModel`` (or ``SD3ControlNetModel`` / ``FluxControlNetModel``).

ControlNets for the transformer families (diffusers' ``SD3ControlNetModel`` for SD 3,
``FluxControlNetModel`` for FLUX) load from diffusers folders only (``config.json`` names the
class); the family runs them inside its ``predict`` (:data:`TRANSFORMER_CLASSES`).

Single files load offline: diffusers-layout weights go into a model built from a config,
original-layout ones (``control_model.*`` keys) through diffusers' converter. The config
is the unit's ``config`` folder if given, else derived from the base model's UNet (a
ControlNet copies its UNet's encoder) with the conditioning-embedding channels read
from the file. Pickle files (``.pth``, ``.ckpt``) load only with ``allow_pickle``.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from aipaint.errors import InvalidParameter, ModelLoadError, UnknownName
from aipaint.plugin.kit import folders
from aipaint.plugin.kit.controlnets import runtime_controlnets
from aipaint.plugin.kit.folders import (
    PICKLE_SUFFIXES,
    SAFE_SUFFIXES,
    controlnet_dir,
    is_inside,
    is_model_folder,
    model_entries,
    path_is,
)
from aipaint.sources.folders import fetch_source

if TYPE_CHECKING:
    import torch

    from aipaint.models.latent import LatentDiffusionModel

FOLDER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DIFFUSERS_KEY = "controlnet_cond_embedding.conv_in.weight"
_HASH_SUFFIX = re.compile(r"^(?P<name>.*?)\s*\[(?P<hash>[0-9a-fA-F]{6,64})\]$")
CACHE_SIZE = 2
TRANSFORMER_CLASSES = ("SD3ControlNetModel", "FluxControlNetModel")
"""diffusers' ControlNets for transformer families: the family model runs them (see
:class:`aipaint.plugin.kit.controlnets.TransformerControlNetRuns`), not the UNet seam."""


def is_transformer_controlnet(controlnet: Any) -> bool:
    """Whether ``controlnet`` is one of :data:`TRANSFORMER_CLASSES` (its class or a subclass)."""
    return any(c.__name__ in TRANSFORMER_CLASSES for c in type(controlnet).__mro__)


class ControlNetNotFound(UnknownName):
    """No zoo card or file in the ControlNet folder has that name."""

    def __init__(self, name: str, valid: list[str], folder: Path) -> None:
        self.valid = tuple(valid)
        listing = ", ".join(repr(v) for v in valid) if valid else "none are installed"
        InvalidParameter.__init__(
            self,
            "ControlNet model",
            name,
            f"available: {listing}",
            f"put diffusers folders or .safetensors files in {folder} (or set AIPAINT_CONTROLNET_DIR), "
            "or pass a path",
        )


class NameOutsideFolder(folders.NameOutsideFolder):
    """A model name that would resolve outside the ControlNet folder."""

    def __init__(self, name: str, folder: Path, why: str) -> None:
        self.why = why
        InvalidParameter.__init__(self, "ControlNet model", name, f"must be a name inside {folder} ({why})",
                         "give the model's name without a folder, or pass a path from Python")


@dataclass(frozen=True)
class ControlNetRef:
    """A located model: what to load and how to name it in PNGs."""

    name: str
    path: Path | None  # a diffusers folder or a single file; None for a model object
    module: Any = None  # a loaded diffusers ControlNetModel
    expected_hash: str = ""

    @property
    def weights_file(self) -> Path | None:
        if self.path is None:
            return None
        if self.path.is_dir():
            return next((self.path / f for f in FOLDER_WEIGHTS if (self.path / f).is_file()), None)
        return self.path

    @property
    def short_hash(self) -> str:
        weights = self.weights_file
        return a1111_model_hash(weights) if weights is not None else ""

    @property
    def display_name(self) -> str:
        """``name [hash]``, as sd-webui-controlnet writes model names into PNGs."""
        digest = self.short_hash
        return f"{self.name} [{digest}]" if digest else self.name


def a1111_model_hash(path: Path) -> str:
    """A1111's legacy short model hash (the one sd-webui-controlnet shows): the first 8 hex
    digits of the sha256 of the 64 KiB at offset 1 MiB. Cheap on multi-GB files; files
    smaller than 1 MiB all share the hash of empty input."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def split_hash(name: str) -> tuple[str, str]:
    """``"canny [d14c016b]"`` → ``("canny", "d14c016b")``."""
    match = _HASH_SUFFIX.match(name.strip())
    return (match["name"], match["hash"].lower()) if match else (name.strip(), "")


def _check_name(name: str, folder: Path) -> PurePosixPath:
    try:
        return folders.check_name("ControlNet model", name, folder)
    except folders.NameOutsideFolder as refused:
        raise NameOutsideFolder(name, folder, refused.why) from None


def folder_models(folder: Path | None = None) -> dict[str, Path]:
    """Every model below the folder by name (relative path, no suffix); safetensors before pickles."""
    return model_entries(folder or controlnet_dir())


def zoo_controlnets() -> dict[str, Any]:
    from aipaint.models import zoo

    return {card.id: card for card in zoo.cards() if card.family == "controlnet"}


def resolve(model: Any, *, allow_pickle: bool = False, folder: Path | None = None) -> ControlNetRef:
    """Locate a unit's model (see the module docstring). Nothing is loaded here."""
    if model is None:
        raise InvalidParameter("ControlNet model", model, "is required: a zoo id, a name in the ControlNet folder or a path")
    if not isinstance(model, (str, Path)):
        if (type(model).__name__ != "ControlNetModel" and not hasattr(model, "controlnet_cond_embedding")
                and not is_transformer_controlnet(model)):
            raise InvalidParameter("ControlNet model", model, "must be a name, a path or a diffusers ControlNetModel, "
                                   "SD3ControlNetModel or FluxControlNetModel")
        name = Path(str(getattr(model.config, "_name_or_path", "") or "controlnet")).name
        return ControlNetRef(name, None, module=model)
    if isinstance(model, Path):
        path = model.expanduser()
        if not path.exists():
            raise ModelLoadError(f"no ControlNet model at {path}")
        _check_suffix(path, allow_pickle)
        return ControlNetRef(path.stem if path.is_file() else path.name, path)
    name, expected = split_hash(model)
    fetched = fetch_source(name, "controlnet", allow_pickle=allow_pickle)  # a link, AIR, hf: reference
    if fetched is not None:
        _check_suffix(fetched, allow_pickle)
        return ControlNetRef(fetched.stem, fetched, expected_hash=expected)
    from aipaint.models import zoo

    card = zoo.find(name)
    if card is not None and card.family == "controlnet":
        return ControlNetRef(card.id, zoo.fetch(card), expected_hash=expected)
    root = folder or controlnet_dir()
    relative = _check_name(name, root)
    direct = [root / relative] if relative.suffix.lower() in SAFE_SUFFIXES + PICKLE_SUFFIXES else []
    direct += [root / relative] if path_is(is_model_folder, root / relative) else []
    direct += [(root / relative).with_name(relative.name + s) for s in SAFE_SUFFIXES + PICKLE_SUFFIXES]
    candidates = [p for p in direct if path_is(Path.exists, p)]
    if not candidates:
        wanted = relative.as_posix().lower()
        models = folder_models(root)
        candidates = [p for n, p in models.items() if n.lower() == wanted or n.lower().rsplit("/", 1)[-1] == wanted]
    if not candidates:
        fetched = fetch_source(name, "controlnet", allow_pickle=allow_pickle, hashes=True)  # by its hash
        if fetched is not None:
            _check_suffix(fetched, allow_pickle)
            return ControlNetRef(fetched.stem, fetched, expected_hash=expected)
        raise ControlNetNotFound(name, sorted(zoo_controlnets()) + sorted(folder_models(root)), root)
    path = candidates[0]
    if not is_inside(path, root):
        raise NameOutsideFolder(name, root, "it is a link that leads out of the folder")
    _check_suffix(path, allow_pickle)
    return ControlNetRef(relative.name if path.is_dir() else path.stem, path, expected_hash=expected)


def _check_suffix(path: Path, allow_pickle: bool) -> None:
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a diffusers ControlNet folder: it has no config.json")
        return
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        from aipaint.models.weights import pickle_refused

        raise pickle_refused(path)
    if suffix not in SAFE_SUFFIXES + PICKLE_SUFFIXES:
        raise ModelLoadError(f"{path.name}: unknown ControlNet file format {suffix!r}; expected .safetensors")


# --------------------------------------------------------------------------- loading
_cache: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
def clear_cache() -> None:
    """Forget loaded ControlNets (they are kept, at most ``CACHE_SIZE``, between generations)."""
    _cache.clear()


def load(ref: ControlNetRef, model: LatentDiffusionModel, *, config: Path | None = None, allow_pickle: bool = False) -> Any:
    """The ``ControlNetModel`` for ``ref``, on the model's device and dtype, checked to fit it
    (or the runtime's stand-in for it, see :func:`aipaint.plugin.kit.controlnets.use_runtime_controlnets`)."""
    if ref.expected_hash and ref.short_hash and ref.expected_hash != ref.short_hash:
        raise ModelLoadError(
            f"ControlNet {ref.name!r} has hash {ref.short_hash}, but the PNG was made with [{ref.expected_hash}]: "
            "a different file of that name, so the image would not be reproduced; pass the model explicitly "
            "(--controlnet) to use this one anyway"
        )
    runtime = runtime_controlnets(model)
    stand_in = runtime(ref, config) if runtime is not None else None
    if stand_in is not None:
        check_fits(stand_in, model, ref.name)
        return stand_in
    if ref.module is not None:
        controlnet = _on(ref.module, model)
    else:
        assert ref.path is not None
        weights = ref.weights_file
        stat = weights.stat() if weights is not None else ref.path.stat()
        key = (str(ref.path.resolve()), stat.st_mtime_ns, stat.st_size, str(config), str(model.device), str(model.dtype),
               _unet_signature(model))
        controlnet = _cache.get(key)
        if controlnet is None:
            controlnet = _load_uncached(ref.path, model, config=config, allow_pickle=allow_pickle)
            controlnet = _on(controlnet, model).eval().requires_grad_(False)
            _cache[key] = controlnet
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
        _cache.move_to_end(key)
    check_fits(controlnet, model, ref.name)
    return controlnet


def _on(controlnet: Any, model: LatentDiffusionModel) -> Any:
    first = next(controlnet.parameters())
    if first.device != model.device or first.dtype != model.dtype:
        controlnet = controlnet.to(model.device, model.dtype)
    return controlnet


def _unet_signature(model: LatentDiffusionModel) -> tuple[Any, ...]:
    c = model.unet.config
    if not hasattr(c, "block_out_channels"):  # a transformer: its ControlNets load from their own config
        return (type(model.unet).__name__, c.in_channels)
    return (tuple(c.block_out_channels), c.cross_attention_dim, c.in_channels)


def _folder_class(path: Path) -> str:
    import json

    try:
        return str(json.loads((path / "config.json").read_text()).get("_class_name", ""))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read the ControlNet config {path / 'config.json'}: {exc}") from exc


def _load_uncached(path: Path, model: LatentDiffusionModel, *, config: Path | None, allow_pickle: bool) -> Any:
    from diffusers import ControlNetModel

    if path.is_dir():
        cls = ControlNetModel
        name = _folder_class(path)
        if name in TRANSFORMER_CLASSES:
            import diffusers

            cls = getattr(diffusers, name)
        try:
            return cls.from_pretrained(path, use_safetensors=None if allow_pickle else True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load the ControlNet folder {path}: {exc}") from exc
    if hasattr(model, "controlnet_problems"):  # a transformer family: no UNet to derive a config from
        raise ModelLoadError(
            f"{path.name}: {model.family} ControlNets load from diffusers folders (config.json + "
            "diffusion_pytorch_model.safetensors), not from single files"
        )
    state = _read_state_dict(path, allow_pickle)
    if DIFFUSERS_KEY in state:
        return _from_diffusers_state(state, path, model, config)
    return _from_original_state(state, path, model, config)


def _read_state_dict(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    from aipaint.models.weights import load_state_dict

    return load_state_dict(path, allow_pickle=allow_pickle)


def _config_from(config: Path | None, model: LatentDiffusionModel, cond_channels: tuple[int, ...]) -> dict[str, Any]:
    """An explicit config folder's config.json, else one derived from the base model's UNet."""
    import json

    import torch
    from diffusers import ControlNetModel

    if config is not None:
        file = config / "config.json" if config.is_dir() else config
        if not file.is_file():
            raise ModelLoadError(f"no ControlNet config.json at {config}")
        return json.loads(file.read_text())
    with torch.device("meta"):
        skeleton = ControlNetModel.from_unet(model.unet, conditioning_embedding_out_channels=cond_channels,
                                             load_weights_from_unet=False)
    return dict(skeleton.config)


def _from_diffusers_state(state: dict[str, Any], path: Path, model: LatentDiffusionModel, config: Path | None) -> Any:
    import torch
    from diffusers import ControlNetModel

    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("controlnet_cond_embedding.blocks.")})
    channels = [int(state[DIFFUSERS_KEY].shape[0])]
    for i in blocks[1::2]:  # blocks alternate: same-width conv, then stride-2 conv to the next width
        channels.append(int(state[f"controlnet_cond_embedding.blocks.{i}.weight"].shape[0]))
    cfg = _config_from(config, model, tuple(channels))
    with torch.device("meta"):
        controlnet = ControlNetModel.from_config(cfg)
    missing, unexpected = controlnet.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ModelLoadError(
            f"{path.name} does not match the ControlNet config ({len(missing)} missing, {len(unexpected)} unexpected "
            f"tensors, e.g. {(missing or unexpected)[:3]}); it was made for another base model, or pass its config folder"
        )
    return controlnet


def _from_original_state(state: dict[str, Any], path: Path, model: LatentDiffusionModel, config: Path | None) -> Any:
    import tempfile

    from diffusers import ControlNetModel

    prefix = "control_model." if any(k.startswith("control_model.") for k in state) else ""
    hint = sorted(
        (int(k[len(prefix) + len("input_hint_block."):].split(".")[0]), v)
        for k, v in state.items()
        if k.startswith(prefix + "input_hint_block.") and k.endswith(".weight")
    )
    if not hint:
        raise ModelLoadError(f"{path.name} is not a ControlNet checkpoint (no input_hint_block / controlnet_cond_embedding)")
    widths = [int(v.shape[0]) for _, v in hint[:-1]]  # the last conv maps to the UNet width
    channels = tuple(w for i, w in enumerate(widths) if i == 0 or w != widths[i - 1])
    with tempfile.TemporaryDirectory() as tmp:
        if config is None:
            import json

            (Path(tmp) / "config.json").write_text(json.dumps(_config_from(None, model, channels)))
            config = Path(tmp)
        try:
            return ControlNetModel.from_single_file(state, config=str(config), local_files_only=True)
        except Exception as exc:  # diffusers' converter raises many types for foreign files
            raise ModelLoadError(f"could not convert {path.name} as an original-layout ControlNet: {exc}") from exc


def check_fits(controlnet: Any, model: LatentDiffusionModel, name: str) -> None:
    """A ControlNet copies its base UNet's encoder; one made for another model would crash mid-run.
    A transformer family says itself whether a ControlNet fits it (``controlnet_problems``)."""
    from aipaint.errors import UnsupportedFeature

    family_check = getattr(model, "controlnet_problems", None)
    if is_transformer_controlnet(controlnet) or family_check is not None:
        if family_check is None:
            raise UnsupportedFeature(
                f"ControlNet {name!r} is a {type(controlnet).__name__}, for a transformer family; "
                f"{model.family} model {model.name!r} runs only UNet ControlNets (ControlNetModel)"
            )
        problems = family_check(controlnet)
        if problems:
            raise ModelLoadError(
                f"ControlNet {name!r} does not fit {model.family} model {model.name!r}: " + "; ".join(problems)
            )
        return
    cn, unet = controlnet.config, model.unet.config
    if getattr(unet, "addition_embed_type", None) == "text_time":
        raise UnsupportedFeature(
            f"ControlNet on {model.name!r} needs SDXL's pooled text embeddings, which the loop's ControlNet seam does "
            "not pass yet; use an SD1.x-architecture model"
        )
    factor = 2 ** (len(cn.conditioning_embedding_out_channels) - 1)
    problems = []
    if tuple(cn.block_out_channels) != tuple(unet.block_out_channels):
        problems.append(f"block widths {tuple(cn.block_out_channels)} vs the UNet's {tuple(unet.block_out_channels)}")
    if cn.cross_attention_dim != unet.cross_attention_dim:
        problems.append(f"text width {cn.cross_attention_dim} vs {unet.cross_attention_dim}")
    if factor != model.vae_scale_factor:
        problems.append(f"control images at {factor}x the latent size vs the VAE's {model.vae_scale_factor}x")
    if cn.in_channels > model.unet_in_channels:
        problems.append(f"{cn.in_channels} latent channels vs {model.unet_in_channels}")
    if problems:
        raise ModelLoadError(f"ControlNet {name!r} was made for another base model than {model.name!r}: " + "; ".join(problems))


def resolve_and_load(name: str | Path, model: LatentDiffusionModel, allow_pickle: bool = False) -> tuple[ControlNetRef, Any]:
    """Locate and load a ControlNet named as a unit names it: the loader this plugin offers
    through :func:`aipaint.plugin.kit.controlnets.provide_controlnet_loader`."""
    ref = resolve(name, allow_pickle=allow_pickle)
    return ref, load(ref, model, allow_pickle=allow_pickle)
