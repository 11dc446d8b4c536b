"""IP-Adapter: the public weights (h94/IP-Adapter) loaded into the UNet through diffusers.

A file holds ``image_proj.*`` (a projection of a CLIP image embedding to a few extra tokens;
"plus" variants use a resampler over the encoder's penultimate hidden states) and
``ip_adapter.*`` (a key and value projection for those tokens in every cross-attention layer).
diffusers' ``UNet2DConditionModel._load_ip_adapter_weights`` turns them into
``IPAdapterAttnProcessor2_0`` processors and an ``encoder_hid_proj``; the UNet then takes
``added_cond_kwargs={"image_embeds": [...]}``, one tensor per adapter, with zero (plain) or
zero-image (plus) embeddings in the negative prompt's rows, as diffusers' pipelines do. Both
are undone when the job ends.

Where weights come from, first found wins:

1. ``model`` as a path to a ``.safetensors`` file, or a name in the IP-Adapter folder
   (``$AIPAINT_IP_ADAPTER_DIR``, else ``$AIPAINT_HOME/ip-adapter``);
2. a Hub file ``h94/IP-Adapter/<file>`` (the default: ``models/ip-adapter_sd15.safetensors``
   for a 768-wide text encoder, ``sdxl_models/ip-adapter_sdxl.safetensors`` for 2048), read from the
   IP-Adapter folder if it holds the same path (``hf download h94/IP-Adapter <file> --local-dir
   <folder>``), else downloaded.

The image encoder defaults to the one each file was trained with: ``sdxl_models/image_encoder``
(OpenCLIP ViT-bigG) for the SDXL files without ``vit-h`` in their name, ``models/image_encoder``
(ViT-H) for the rest; ``image_encoder`` names another diffusers ``CLIPVisionModelWithProjection`` folder.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aipaint.engine.loop import LoopContributor
from aipaint.errors import DownloadError, InvalidParameter, MissingWeights, ModelLoadError

if TYPE_CHECKING:
    from .units import ReferenceUnit

HUB_REPO = "h94/IP-Adapter"
DEFAULT_FILES: dict[int, str] = {768: "models/ip-adapter_sd15.safetensors", 2048: "sdxl_models/ip-adapter_sdxl.safetensors"}
ENCODER_FILES = ("config.json", "model.safetensors")


def ip_adapter_dir() -> Path:
    from aipaint.plugin.kit.folders import default_folder

    return default_folder("AIPAINT_IP_ADAPTER_DIR", "ip-adapter")


def encoder_for(hub_file: str) -> str:
    """The Hub folder of the image encoder a published IP-Adapter file was trained with."""
    name = Path(hub_file).name.lower()
    return "sdxl_models/image_encoder" if hub_file.startswith("sdxl_models/") and "vit-h" not in name else "models/image_encoder"


def _hub_path(text: str) -> str | None:
    prefix = HUB_REPO + "/"
    return text[len(prefix):] if text.startswith(prefix) and len(text) > len(prefix) else None


def _local_copy(relative: str) -> Path | None:
    """``relative`` (a Hub path) inside the IP-Adapter folder, contained there, or None."""
    from aipaint.plugin.kit.folders import check_name, is_inside, path_is

    root = ip_adapter_dir()
    check_name("IP-Adapter file", relative, root)
    path = root / relative
    return path if path.exists() and is_inside(path, root) and (path_is(Path.is_file, path) or path_is(Path.is_dir, path)) else None


def _download(relative: str, *, folder: bool) -> Path:
    from aipaint.models.zoo import download_from_hub

    try:
        if folder:
            patterns = [f"{relative}/{name}" for name in ENCODER_FILES]
            return download_from_hub(HUB_REPO, patterns=patterns) / relative
        return download_from_hub(HUB_REPO, relative)
    except DownloadError as exc:
        raise MissingWeights(
            "IP-Adapter", f"{HUB_REPO}/{relative}", [str(ip_adapter_dir())],
            f"{exc}; or put it at {ip_adapter_dir() / relative}",
        ) from exc


def resolve_weights(value: Any, cross_attention_dim: int, index: int) -> tuple[str, Path, str | None]:
    """(name recorded in the PNG, local file, its Hub path or None) for a unit's ``model``. The name
    reads back through this function: ``h94/IP-Adapter/<file>`` for Hub files, else the file's stem."""
    if value is None:
        if cross_attention_dim not in DEFAULT_FILES:
            raise InvalidParameter(f"Reference {index} model", None,
                                   f"has no default for a UNet with cross-attention width {cross_attention_dim}; "
                                   "give an IP-Adapter file made for this model")
        value = f"{HUB_REPO}/{DEFAULT_FILES[cross_attention_dim]}"
    if isinstance(value, Path) or (isinstance(value, str) and value.endswith(".safetensors") and Path(value).expanduser().is_file()):
        path = Path(value).expanduser()
        if path.suffix != ".safetensors":
            raise InvalidParameter(f"Reference {index} model", str(value), "must be a .safetensors file")
        return path.stem, path, None
    text = str(value)
    hub = _hub_path(text)
    if hub is not None:
        local = _local_copy(hub)
        return text, local if local is not None else _download(hub, folder=False), hub
    from aipaint.plugin.kit.folders import ModelFolder

    found = ModelFolder(ip_adapter_dir(), "IP-Adapter", name_example="ip-adapter_sd15").resolve(text)
    return Path(found.name).stem, found.path, None


def resolve_encoder(value: Any, hub_file: str | None, weights: Path, index: int) -> tuple[str, Path]:
    """(name recorded, local diffusers folder) of the CLIP vision encoder for one unit."""
    if value is None:
        if hub_file is None:
            guess = f"sdxl_models/{weights.name}" if "sdxl" in weights.name.lower() else weights.name
            value = f"{HUB_REPO}/{encoder_for(guess)}"
        else:
            value = f"{HUB_REPO}/{encoder_for(hub_file)}"
    text = str(value)
    hub = _hub_path(text)
    if hub is not None:
        local = _local_copy(hub)
        return text, local if local is not None else _download(hub, folder=True)
    path = Path(text).expanduser()
    if not path.is_dir():
        local = _local_copy(text)
        if local is None:
            raise InvalidParameter(f"Reference {index} image_encoder", text,
                                   f"must be a diffusers CLIPVisionModelWithProjection folder, a folder in {ip_adapter_dir()}, "
                                   f"or {HUB_REPO}/<folder>")
        path = local
    return path.name, path


def read_ip_adapter(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """An IP-Adapter ``.safetensors`` file as diffusers' loader takes it: ``{"image_proj": …, "ip_adapter": …}``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"cannot read the IP-Adapter file {path}: {exc}") from exc
    state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, tensor in tensors.items():
        prefix, _, rest = key.partition(".")
        if prefix in state:
            state[prefix][rest] = tensor
    if not state["image_proj"] or not state["ip_adapter"]:
        raise ModelLoadError(f"{path} is not an IP-Adapter file: it has no image_proj.* and ip_adapter.* tensors")
    return state


def load_image_encoder(folder: Path, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import CLIPVisionModelWithProjection

    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is not a CLIP image encoder folder (no config.json)")
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(str(folder), use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the image encoder in {folder}: {exc}") from exc
    return encoder.to(device, dtype).eval()


def image_embeddings(encoder: Any, image: Any, *, hidden_states: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) embeddings of one image, shaped as diffusers' pipelines pass one adapter's
    (1, 1, dim) or, for hidden states, (1, 1, tokens, dim); the negative is zeros or a black image's."""
    from transformers import CLIPImageProcessor

    pixels = CLIPImageProcessor()(image, return_tensors="pt").pixel_values
    pixels = pixels.to(encoder.device, encoder.dtype)
    with torch.inference_mode():
        if hidden_states:
            positive = encoder(pixels, output_hidden_states=True).hidden_states[-2]
            negative = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        else:
            positive = encoder(pixels).image_embeds
            negative = torch.zeros_like(positive)
    return positive[None], negative[None]


class IPAdapterContributor(LoopContributor):
    """Hands each adapter's image embeddings to the UNet, lined up with the loop's rows: the negative
    embeddings in the negative prompt's rows (when the call has them), the positive ones elsewhere."""

    def __init__(self, positives: list[torch.Tensor], negatives: list[torch.Tensor], batch_size: int) -> None:
        self.positives = positives
        self.negatives = negatives
        self.batch_size = batch_size
        self.guided = True

    def before_call(self, step: int, guided: bool) -> None:
        self.guided = guided

    def unet_kwargs(self, step: int, latent_input: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> dict[str, Any]:
        rows = latent_input.shape[0]
        negative_rows = self.batch_size if self.guided else 0
        image_embeds = []
        for positive, negative in zip(self.positives, self.negatives, strict=True):
            parts = [negative.expand(negative_rows, *negative.shape[1:])] if negative_rows else []
            parts.append(positive.expand(rows - negative_rows, *positive.shape[1:]))
            image_embeds.append(torch.cat(parts).to(latent_input.device))
        return {"added_cond_kwargs": {"image_embeds": image_embeds}}


def activate_ip_adapters(model: Any, units: list[ReferenceUnit], request: Any,
                         stack: ExitStack) -> tuple[IPAdapterContributor, list[tuple[str, str]]]:
    """Load every unit's adapter into the UNet at once (diffusers' multi-adapter form), set their
    scales to the units' weights, and encode the reference images. ``stack`` undoes the UNet changes."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection

    unet = model.unet
    cross_attention_dim = int(unet.config.cross_attention_dim)
    resolved = []
    for unit in units:
        name, path, hub = resolve_weights(unit.model, cross_attention_dim, unit.index)
        encoder_name, encoder_path = resolve_encoder(unit.image_encoder, hub, path, unit.index)
        resolved.append((unit, name, read_ip_adapter(path), encoder_name, encoder_path))
    for _unit, name, state, _, _ in resolved:
        width = next(iter(state["ip_adapter"].values())).shape[-1]
        if width != cross_attention_dim:
            raise ModelLoadError(f"the IP-Adapter {name!r} is made for a text width of {width}, but this model's UNet "
                                 f"has {cross_attention_dim} (an SD 1.5 adapter on SDXL, or the reverse)")
    previous = (unet.encoder_hid_proj, unet.config.encoder_hid_dim_type, getattr(unet, "text_encoder_hid_proj", None))

    def restore() -> None:
        unet.encoder_hid_proj, unet.config.encoder_hid_dim_type = previous[0], previous[1]
        if previous[2] is None and hasattr(unet, "text_encoder_hid_proj"):
            del unet.text_encoder_hid_proj

    stack.callback(restore)
    try:
        unet._load_ip_adapter_weights([state for _, _, state, _, _ in resolved], low_cpu_mem_usage=False)
    except (KeyError, RuntimeError) as exc:
        names = ", ".join(name for _, name, _, _, _ in resolved)
        raise ModelLoadError(f"the IP-Adapter {names} does not fit this model's UNet: {exc}") from exc
    for processor in unet.attn_processors.values():
        if isinstance(processor, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)):
            processor.scale = [unit.weight for unit in units]
    positives, negatives, names = [], [], []
    encoders: dict[Path, Any] = {}
    for i, (unit, name, _, encoder_name, encoder_path) in enumerate(resolved):
        if encoder_path not in encoders:
            encoders[encoder_path] = load_image_encoder(encoder_path, model.device, model.dtype)
        hidden = not isinstance(unet.encoder_hid_proj.image_projection_layers[i], ImageProjection)
        positive, negative = image_embeddings(encoders[encoder_path], unit.image, hidden_states=hidden)
        positives.append(positive.to(model.dtype))
        negatives.append(negative.to(model.dtype))
        names.append((name, encoder_name))
    return IPAdapterContributor(positives, negatives, int(request.batch_size)), names
