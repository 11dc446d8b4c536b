"""LoRA files as people share them, read into data: a list of :class:`WeightPatch` records.

Formats understood (keys are grouped by the module they address):

* kohya / A1111 (sd-scripts): ``lora_unet_<path>``, ``lora_te_<path>`` (``lora_te1_``) and,
  for SDXL's second text encoder, ``lora_te2_<path>``, with ``.lora_down.weight``,
  ``.lora_up.weight``, optional ``.lora_mid.weight`` (LoCon tucker) and ``.alpha``.
  ``<path>`` is the diffusers / transformers module path with its dots written as
  underscores, or, for the UNet of sd-scripts' SDXL files, the SGM (original Stability)
  name (``lora_unet_input_blocks_4_1_…``, ``middle_block_…``, ``output_blocks_…``,
  ``time_embed_…``, ``label_emb_…``, ``out_2``), which diffusers' own converter renames.
* kohya FLUX files in Black Forest Labs' naming (``lora_unet_double_blocks_0_img_attn_qkv``,
  ``lora_unet_single_blocks_0_linear1``) and SD 3 files in Stability's
  (``lora_unet_joint_blocks_0_x_block_attn_qkv``): fused q/k/v (and FLUX's single blocks'
  q/k/v/MLP) layers are split into diffusers' modules at the model's own widths.
* a T5 text encoder's modules (SD 3's and FLUX's) under sd-scripts' ``lora_te3_<path>``
  (``lora_te3_encoder_block_0_layer_0_SelfAttention_q``), whatever the model calls that encoder.
* diffusers / PEFT: ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` (``transformer.<path>``
  for SD 3 and FLUX; also with a PEFT
  adapter name, ``base_model.model.`` prefixes, or no component prefix), ``text_encoder.…``,
  ``text_encoder_2.…``,
  diffusers' older attention-processor layout (``…attn1.processor.to_q_lora.down.weight``),
  and the ``lora_alpha``/``r``/``use_rslora``/``alpha_pattern`` diffusers stores in the
  safetensors metadata (``lora_adapter_metadata``).
* LyCORIS: LoHa (``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, optional
  ``hada_t1``/``hada_t2``), LoKr (``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``, ``lokr_w2`` or
  ``lokr_w2_a``/``lokr_w2_b``, optional ``lokr_t2``) and full differences (``diff``). The
  weight differences are computed here with the formulas of A1111's ``network_hada.py`` /
  ``network_lokr.py`` (the LyCORIS package itself is not a dependency).

Every key that does not become part of a patch — an unknown module, an unknown tensor
type, a shape that does not fit the model, an incomplete group — is listed in
:attr:`LoraPatches.unmatched` with the reason; callers warn about them. Nothing is
dropped silently.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

# kohya key naming is the kit's: the training commands save under the same keys this reads.
from aipaint.plugin.kit.kohya import KOHYA_PREFIX_OF, T5_PREFIX, canonical_path, is_t5_path, kohya_key

# Component names are those of aipaint.models.latent.LatentDiffusionModel.modules() (text_encoder_2: SDXL's).
KOHYA_PREFIXES: dict[str, str] = {
    "lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
}
# ``transformer.``: diffusers/PEFT files of transformer families (SD 3, FLUX), whose denoiser is the
# model's ``unet`` component.
DOTTED_PREFIXES: dict[str, str] = {
    "unet.": "unet", "transformer.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2",
}

# Key ending -> (patch kind or None for "any kind", the tensor's role in that kind).
_ROLES: dict[str, tuple[str | None, str]] = {
    ".lora_down.weight": ("lora", "down"),
    ".lora_up.weight": ("lora", "up"),
    ".lora_mid.weight": ("lora", "mid"),
    ".lora_A.weight": ("lora", "down"),
    ".lora_B.weight": ("lora", "up"),
    ".lora.down.weight": ("lora", "down"),
    ".lora.up.weight": ("lora", "up"),
    ".lora_linear_layer.down.weight": ("lora", "down"),
    ".lora_linear_layer.up.weight": ("lora", "up"),
    ".hada_w1_a": ("loha", "w1a"),
    ".hada_w1_b": ("loha", "w1b"),
    ".hada_w2_a": ("loha", "w2a"),
    ".hada_w2_b": ("loha", "w2b"),
    ".hada_t1": ("loha", "t1"),
    ".hada_t2": ("loha", "t2"),
    ".lokr_w1": ("lokr", "w1"),
    ".lokr_w1_a": ("lokr", "w1a"),
    ".lokr_w1_b": ("lokr", "w1b"),
    ".lokr_w2": ("lokr", "w2"),
    ".lokr_w2_a": ("lokr", "w2a"),
    ".lokr_w2_b": ("lokr", "w2b"),
    ".lokr_t2": ("lokr", "t2"),
    ".diff": ("full", "diff"),
    ".alpha": (None, "alpha"),
}
# Longest endings first, so ".lora.down.weight" is not read as something shorter.
_ENDINGS = sorted(_ROLES, key=len, reverse=True)
_PEFT_ADAPTER_NAME = re.compile(r"\.(lora_[AB])\.(?!weight$)[^.]+\.weight$")
_OLD_DIFFUSERS = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_REQUIRED: dict[str, tuple[tuple[str, ...], ...]] = {  # per kind: alternatives of required role sets
    "lora": (("down", "up"),),
    "loha": (("w1a", "w1b", "w2a", "w2b"),),
    "lokr": (("w1", "w2"), ("w1", "w2a", "w2b"), ("w1a", "w1b", "w2"), ("w1a", "w1b", "w2a", "w2b"),
             ("w1", "w2a", "w2b", "t2"), ("w1a", "w1b", "w2a", "w2b", "t2")),
    "full": (("diff",),),
}


class LoraFormatError(ValueError):
    """A group of tensors that cannot form a weight difference (inconsistent shapes)."""


@dataclass(frozen=True, eq=False)
class WeightPatch:
    """One module's weight change, as data: ``ΔW = scale · f(tensors)``.

    ``component`` is ``"unet"``, ``"text_encoder"`` or ``"text_encoder_2"``, ``module`` the module path inside it
    (diffusers / transformers naming), ``kind`` one of ``lora``, ``loha``, ``lokr``,
    ``full``; ``scale`` is what the file asks for (``alpha / rank``, 1 without alpha). The
    user's weight multiplies it when the patch is applied.
    """

    component: str
    module: str
    kind: str
    tensors: Mapping[str, torch.Tensor]
    scale: float
    keys: tuple[str, ...] = ()

    @property
    def target(self) -> tuple[str, str]:
        return (self.component, self.module)

    def delta(self, shape: torch.Size | tuple[int, ...], device: torch.device | str | None = None) -> torch.Tensor:
        """``ΔW`` in float32, shaped like the weight it patches (computed on ``device``)."""
        with torch.no_grad():
            tensors = {k: v.to(device=device, dtype=torch.float32) for k, v in self.tensors.items()}
            raw = _DELTAS[self.kind](tensors, tuple(shape))
            if raw.numel() != math.prod(shape):
                raise LoraFormatError(f"makes a {tuple(raw.shape)} difference for a {tuple(shape)} weight")
            return raw.reshape(shape) * self.scale


@dataclass
class LoraPatches:
    """A LoRA file matched against one model: its patches and every key that matched nothing."""

    patches: list[WeightPatch]
    unmatched: dict[str, str] = field(default_factory=dict)  # key -> why it was not used
    formats: tuple[str, ...] = ()  # e.g. ("kohya",), ("peft",), ("kohya", "loha")

    def components(self) -> set[str]:
        return {p.component for p in self.patches}


# --- the weight-difference formulas --------------------------------------------------------


def _lora_delta(t: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    up, down = t["up"], t["down"]
    if "mid" in t:  # LoCon with a tucker-decomposed middle (A1111's rebuild_cp_decomposition)
        return torch.einsum("n m k l, i n, m j -> i j k l", t["mid"], up.flatten(1), down.flatten(1))
    product = up.flatten(1) @ down.flatten(1)
    if down.dim() == 4 and len(shape) == 4:
        return product.reshape(up.shape[0], down.shape[1], *down.shape[2:])
    return product


def _cp_rebuild(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A1111's ``make_weight_cp`` (tucker form of a LoHa half)."""
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def _loha_delta(t: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    if "t1" in t and "t2" in t:
        return _cp_rebuild(t["t1"], t["w1a"], t["w1b"]) * _cp_rebuild(t["t2"], t["w2a"], t["w2b"])
    return (t["w1a"] @ t["w1b"]) * (t["w2a"] @ t["w2b"])


def _lokr_delta(t: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    w1 = t["w1"] if "w1" in t else t["w1a"] @ t["w1b"]
    if "w2" in t:
        w2 = t["w2"]
    elif "t2" in t:  # A1111's rebuild_tucker
        w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["t2"], t["w2b"], t["w2a"])
    else:
        w2 = t["w2a"] @ t["w2b"]
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    return torch.kron(w1, w2.contiguous())


def _full_delta(t: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    return t["diff"]


_DELTAS: dict[str, Callable[[Mapping[str, torch.Tensor], tuple[int, ...]], torch.Tensor]] = {
    "lora": _lora_delta,
    "loha": _loha_delta,
    "lokr": _lokr_delta,
    "full": _full_delta,
}


def _rank(kind: str, t: Mapping[str, torch.Tensor]) -> int | None:
    if kind == "lora":
        return int(t["down"].shape[0])
    if kind == "loha":
        return int(t["w1b"].shape[0])
    if kind == "lokr":  # as A1111: the rank of a decomposed half; w2's wins when both are
        if "w2b" in t:
            return int(t["w2b"].shape[0])
        if "w1b" in t:
            return int(t["w1b"].shape[0])
    return None


# --- where keys point: the model's modules ---------------------------------------------------


def patchable_modules(root: nn.Module) -> dict[str, nn.Module]:
    """Linear and Conv2d modules by path (a ``torch.compile`` wrapper is looked through)."""
    root = getattr(root, "_orig_mod", root)
    return {name: m for name, m in root.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and name}


@dataclass
class ModuleTable:
    """Where LoRA keys can point in one model: kohya names and dotted paths → (component, module path).

    ``modules`` maps (component, canonical path) to the module's actual path in this model;
    ``unet_layers_per_block`` is what renumbering SGM block names needs (None: not an int).
    """

    shapes: dict[tuple[str, str], torch.Size]
    modules: dict[tuple[str, str], str]
    kohya: dict[str, tuple[str, str]]
    unet_layers_per_block: int | None = None

    @classmethod
    def for_components(cls, components: Mapping[str, nn.Module]) -> ModuleTable:
        shapes: dict[tuple[str, str], torch.Size] = {}
        modules: dict[tuple[str, str], str] = {}
        kohya: dict[str, tuple[str, str]] = {}
        for component, root in components.items():
            for path, module in patchable_modules(root).items():
                shapes[(component, path)] = module.weight.shape
                modules[(component, canonical_path(component, path))] = path
                if component != "unet" and is_t5_path(path):  # sd-scripts' lora_te3_, whatever the component
                    kohya.setdefault(T5_PREFIX + path.replace(".", "_"), (component, path))
                elif component in KOHYA_PREFIX_OF:
                    kohya.setdefault(kohya_key(component, path), (component, path))
        unet = components.get("unet")
        config = getattr(getattr(unet, "_orig_mod", unet), "config", None)
        layers = getattr(config, "layers_per_block", None)
        return cls(shapes, modules, kohya, layers if isinstance(layers, int) and not isinstance(layers, bool) else None)

    def find(self, base: str) -> tuple[str, str] | None:
        """The (component, actual module path) a key's base name addresses, or None."""
        if base.startswith(T5_PREFIX):
            return self.kohya.get(base)
        for prefix, component in KOHYA_PREFIXES.items():
            if base.startswith(prefix):
                found = self.kohya.get(KOHYA_PREFIX_OF[component] + base[len(prefix):])
                return found if found is not None or component != "unet" else self._converted_unet_key(base)
        if base.startswith("base_model.model."):
            base = base[len("base_model.model."):]
        for prefix, component in DOTTED_PREFIXES.items():
            if base.startswith(prefix):
                path = self.modules.get((component, canonical_path(component, base[len(prefix):])))
                return (component, path) if path is not None else None
        for component in DOTTED_PREFIXES.values():  # a bare PEFT state dict of one network
            path = self.modules.get((component, canonical_path(component, base)))
            if path is not None:
                return (component, path)
        return None

    def _converted_unet_key(self, base: str) -> tuple[str, str] | None:
        """A kohya UNet name this model does not know as written, as diffusers' converter reads it:
        sd-scripts' SDXL files name the SGM UNet's modules (``input_blocks_4_1_…``), renumbered
        here for this UNet's ``layers_per_block``, and ``time_embed`` / ``label_emb`` / ``out_2``."""
        if self.unet_layers_per_block is None:
            return None
        from diffusers.loaders.lora_conversion_utils import (
            _convert_unet_lora_key,
            _maybe_map_sgm_blocks_to_diffusers,
        )

        try:
            (renumbered,) = _maybe_map_sgm_blocks_to_diffusers(
                {base: None}, SimpleNamespace(layers_per_block=self.unet_layers_per_block)
            )
        except (ValueError, IndexError):  # an SGM-looking name with block numbers no UNet has
            return None
        # The converter writes diffusers' attention-processor layout, which _split_key reads.
        split = _split_key(_convert_unet_lora_key(renumbered + ".lora_down.weight"))
        path = self.modules.get(("unet", split[0])) if split is not None else None
        return ("unet", path) if path is not None else None


def _split_key(key: str) -> tuple[str, str | None, str] | None:
    """``(base, kind, role)`` of a key, or None when its ending is not a known tensor type."""
    key = _PEFT_ADAPTER_NAME.sub(r".\1.weight", key)
    old = _OLD_DIFFUSERS.search(key)
    if old:
        module = "to_out.0" if old[1] == "to_out" else old[1]
        key = key[: old.start()] + f".{module}.lora.{old[2]}.weight"
    for ending in _ENDINGS:
        if key.endswith(ending):
            kind, role = _ROLES[ending]
            return key[: -len(ending)], kind, role
    return None


def _format_of(base: str, kind: str) -> str:
    if kind != "lora":
        return kind
    return "kohya" if base.startswith(tuple(KOHYA_PREFIXES)) else "peft"


@dataclass(frozen=True)
class _AlphaConfig:
    """diffusers' ``lora_adapter_metadata`` for one component (PEFT's LoraConfig fields)."""

    alpha: float | None = None
    rslora: bool = False
    pattern: Mapping[str, float] = field(default_factory=dict)

    def alpha_for(self, module: str) -> float | None:
        for key, value in self.pattern.items():  # PEFT's rule: the key matches a suffix of the module path
            if re.match(rf"(.*\.)?({key})$", module):
                return float(value)
        return self.alpha


def _alpha_configs(metadata: Mapping[str, str] | None) -> dict[str, _AlphaConfig]:
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    configs = {}
    for component in DOTTED_PREFIXES.values():
        alpha = data.get(f"{component}.lora_alpha")
        if alpha is None and data.get(f"{component}.r") is None:
            continue
        configs[component] = _AlphaConfig(
            None if alpha is None else float(alpha),
            bool(data.get(f"{component}.use_rslora", False)),
            dict(data.get(f"{component}.alpha_pattern") or {}),
        )
    return configs


# kohya (sd-scripts) LoRAs of transformer families name the original checkpoints' modules, some of
# them fused: FLUX's Black Forest Labs names (``lora_unet_double_blocks_3_img_attn_qkv``) and SD 3's
# Stability names (``lora_unet_joint_blocks_3_x_block_attn_qkv``). Block kind → (diffusers block
# prefix, original layer name → the diffusers modules it holds, in the order of its rows).
_FUSED_KOHYA = re.compile(
    r"^lora_unet_(double_blocks|single_blocks|joint_blocks)_(\d+)_(.+?)(\.(?:lora_down|lora_up)\.weight|\.alpha)$"
)
_FUSED_BLOCKS: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "double_blocks": ("transformer_blocks", {  # FLUX
        "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        "img_attn_proj": ("attn.to_out.0",), "txt_attn_proj": ("attn.to_add_out",),
        "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",),
        "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",),
        "img_mod_lin": ("norm1.linear",), "txt_mod_lin": ("norm1_context.linear",),
    }),
    "single_blocks": ("single_transformer_blocks", {  # FLUX
        "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
        "modulation_lin": ("norm.linear",),
    }),
    "joint_blocks": ("transformer_blocks", {  # SD 3 / 3.5 (MMDiT); adaLN left out: the last block's is reordered
        "x_block_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "x_block_attn_proj": ("attn.to_out.0",),
        "x_block_attn2_qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
        "x_block_attn2_proj": ("attn2.to_out.0",),
        "context_block_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        "context_block_attn_proj": ("attn.to_add_out",),
        "x_block_mlp_fc1": ("ff.net.0.proj",), "x_block_mlp_fc2": ("ff.net.2",),
        "context_block_mlp_fc1": ("ff_context.net.0.proj",), "context_block_mlp_fc2": ("ff_context.net.2",),
    }),
}


def _from_fused_kohya(state_dict: Mapping[str, torch.Tensor], table: ModuleTable) -> dict[str, torch.Tensor]:
    """kohya keys in FLUX's or SD 3's original names rewritten as ``transformer.<diffusers path>``
    LoRA groups; other keys pass through. A fused layer (``img_attn_qkv``, FLUX's single blocks'
    ``linear1``, SD 3's ``x_block_attn_qkv``) becomes one group per diffusers module, each with the
    shared ``lora_down`` and its rows of ``lora_up``, split at the widths of this model's modules
    (as diffusers' converters do at the published widths). A group that cannot be split is left as
    it was, to be reported as matching nothing."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        m = _FUSED_KOHYA.match(key)
        if m is None or m[3] not in _FUSED_BLOCKS[m[1]][1]:
            out[key] = tensor
            continue
        fused.setdefault((m[1], m[2], m[3]), {})[m[4]] = tensor
    for (kind, index, name), parts in fused.items():
        prefix, layers = _FUSED_BLOCKS[kind]
        block = f"{prefix}.{index}"
        targets = layers[name]
        up = parts.get(".lora_up.weight")
        widths = [table.shapes.get(("unet", f"{block}.{t}"), (None,))[0] for t in targets]
        if up is None or None in widths or sum(widths) != up.shape[0]:
            for ending, tensor in parts.items():  # unsplittable: keep the original keys, reported later
                out[f"lora_unet_{kind}_{index}_{name}{ending}"] = tensor
            continue
        for target, piece in zip(targets, torch.split(up, widths, dim=0), strict=True):
            base = f"transformer.{block}.{target}"
            out[f"{base}.lora_up.weight"] = piece
            for ending in (".lora_down.weight", ".alpha"):
                if ending in parts:
                    out[base + ending] = parts[ending]
    return out


def match_patches(
    state_dict: Mapping[str, torch.Tensor], table: ModuleTable, metadata: Mapping[str, str] | None = None
) -> LoraPatches:
    """Group a LoRA state dict by module, match each group to the model, build its patch.

    Every key ends up either in a patch or in ``unmatched`` with a reason.
    """
    if any(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_unet_joint_blocks_"))
           for k in state_dict):
        state_dict = _from_fused_kohya(state_dict, table)
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    kinds: dict[str, set[str]] = {}
    unmatched: dict[str, str] = {}
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            unmatched[key] = "not a tensor"
            continue
        split = _split_key(key)
        if split is None:
            unmatched[key] = "unknown tensor type (not LoRA, LoHa, LoKr or a full difference)"
            continue
        base, kind, role = split
        groups.setdefault(base, {})[role] = (key, tensor)
        if kind is not None:
            kinds.setdefault(base, set()).add(kind)

    alpha_configs = _alpha_configs(metadata)
    patches: list[WeightPatch] = []
    formats: dict[str, None] = {}
    for base, roles in groups.items():
        keys = tuple(k for k, _ in roles.values())
        found_kinds = kinds.get(base, set())

        def reject(reason: str, keys: tuple[str, ...] = keys) -> None:
            for k in keys:
                unmatched[k] = reason

        if len(found_kinds) != 1:
            reject("an alpha without weights" if not found_kinds else f"mixes {', '.join(sorted(found_kinds))} tensors")
            continue
        kind = found_kinds.pop()
        target = table.find(base)
        if target is None:
            reject("no module of this model has that name")
            continue
        tensors = {role: t for role, (_, t) in roles.items() if role != "alpha"}
        if not any(set(option) <= set(tensors) for option in _REQUIRED[kind]):
            reject(f"an incomplete {kind} group ({', '.join(sorted(tensors))})")
            continue
        alpha: float | None = float(roles["alpha"][1].item()) if "alpha" in roles else None
        rslora = False
        if alpha is None and target[0] in alpha_configs:
            config = alpha_configs[target[0]]
            alpha, rslora = config.alpha_for(target[1]), config.rslora
        rank = _rank(kind, tensors)
        # kohya treats a missing or zero alpha as alpha = rank (scale 1).
        if alpha and rank:
            scale = alpha / (math.sqrt(rank) if rslora else rank)
        else:
            scale = 1.0
        patch = WeightPatch(target[0], target[1], kind, tensors, scale, keys)
        try:
            patch.delta(table.shapes[target])  # validate once, here, so a bad group is reported, not applied
        except (LoraFormatError, RuntimeError, KeyError) as exc:
            reject(f"does not fit {target[0]}.{target[1]} {tuple(table.shapes[target])}: {exc}")
            continue
        patches.append(patch)
        formats[_format_of(base, kind)] = None
    return LoraPatches(patches, unmatched, tuple(formats))

