"""Stand-ins for a model's torch networks that run an exported session instead (an ONNX
Runtime session, a TensorRT engine): the runtimes' shared half. A stand-in keeps the
original module's ``config`` and is called the way diffusers calls the module; anything a
stand-in cannot do (an attribute an adapter would patch, an argument the export lacks) is a
typed :class:`~aipaint.errors.UnsupportedFeature`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from aipaint.errors import ModelLoadError, UnsupportedFeature
from aipaint.plugin.kit.exports import CONTROLNET_PREFIX, Manifest, controlnet_source_matches, resolve_shape

if TYPE_CHECKING:
    from aipaint.models.latent import LatentDiffusionModel

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}  # manifest dtype names


class Session(Protocol):
    """What a stand-in calls: named inputs and outputs with their manifest records
    (``{"shape": [...], "dtype": "float16"}``), the providers it runs on, and a call from
    named torch tensors to named torch tensors."""

    inputs: Mapping[str, Any]
    outputs: Mapping[str, Any]
    providers: Sequence[str]

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]: ...


class NotInExport(UnsupportedFeature, AttributeError):
    """A torch attribute was asked of an exported component that does not have it.

    An ``AttributeError`` too, so ``hasattr`` keeps working on the stand-ins.
    """


class ExportedComponent(torch.nn.Module):
    """Carries the original module's ``config`` so code that reads it keeps working."""

    def __init__(self, config: Any, session: Session, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.config = config
        self.session = session
        self._dtype = dtype
        self._device = device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def providers(self) -> list[str]:
        return list(self.session.providers)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            raise NotInExport(
                f"{type(self).__name__} runs an ONNX export and has no torch attribute {name!r}; "
                "adapters that change weights (LoRA, textual inversion) must be fused at export "
                "(`aipaint export onnx --lora NAME:WEIGHT`), or use the torch runtime"
            ) from None


class ExportedUNet(ExportedComponent):
    """The UNet as an ONNX session, callable like diffusers' ``UNet2DConditionModel``."""

    def __init__(self, original: torch.nn.Module, session: Session, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(original.config, session, dtype, device)
        names = list(session.inputs)
        self.extra_names = [n for n in names[3:] if "residual" not in n]
        self.residual_names = [n for n in names if "residual" in n]
        self._zeros: dict[tuple[Any, ...], torch.Tensor] = {}

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        *,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        return_dict: bool = True,
        **unsupported: Any,
    ) -> Any:
        used = {k: v for k, v in unsupported.items() if v is not None}
        if used:
            raise UnsupportedFeature(
                f"the exported UNet does not take {', '.join(sorted(used))}; generate with the torch runtime for that"
            )
        out = self.call(sample, timestep, encoder_hidden_states, added_cond_kwargs, down_block_additional_residuals,
                        mid_block_additional_residual)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)

    def call(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_residuals: Sequence[torch.Tensor] | None = None,
        mid_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch = sample.shape[0]
        t = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1).expand(batch)
        feed = {"sample": sample, "timestep": t, "encoder_hidden_states": encoder_hidden_states}
        extras = dict(added_cond_kwargs or {})
        missing = [n for n in self.extra_names if n not in extras]
        if missing or set(extras) - set(self.extra_names):
            raise UnsupportedFeature(
                f"the exported UNet takes the extra conditioning {self.extra_names or 'nothing'}, got {sorted(extras) or 'nothing'}"
            )
        feed.update(extras)
        if (down_residuals is None) != (mid_residual is None):
            raise UnsupportedFeature("the exported UNet needs both ControlNet down and mid residuals, or neither")
        if down_residuals is not None:
            if not self.residual_names:
                raise UnsupportedFeature(
                    "this export has no ControlNet inputs (exported with --no-controlnet-inputs); re-export to use ControlNet"
                )
            residuals = [*down_residuals, mid_residual]
            if len(residuals) != len(self.residual_names):
                raise UnsupportedFeature(
                    f"ControlNet gave {len(residuals)} residuals, the exported UNet takes {len(self.residual_names)}"
                )
            feed.update(zip(self.residual_names, residuals))
        elif self.residual_names:
            feed.update(self._zero_residuals(sample))
        return self.session(**feed)["out_sample"].to(self.dtype)

    def _zero_residuals(self, sample: torch.Tensor) -> dict[str, torch.Tensor]:
        symbols = {"batch": sample.shape[0], "height": sample.shape[2], "width": sample.shape[3]}
        zeros = {}
        for name in self.residual_names:
            shape = resolve_shape(self.session.inputs[name]["shape"], symbols)
            key = (shape, sample.device)
            if key not in self._zeros:
                dtype = TORCH_DTYPES[self.session.inputs[name]["dtype"]]
                self._zeros[key] = torch.zeros(shape, dtype=dtype, device=sample.device)
            zeros[name] = self._zeros[key]
        return zeros


class ExportedVae(ExportedComponent):
    """The VAE as up to two sessions (decoder, encoder), with diffusers' ``encode``/``decode`` signatures."""

    def __init__(self, original: torch.nn.Module, decoder: Session | None, encoder: Session | None,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(original.config, decoder or encoder, dtype, device)
        self.decoder_session = decoder
        self.encoder_session = encoder

    def decode(self, latents: torch.Tensor, return_dict: bool = True) -> Any:
        if self.decoder_session is None:
            raise UnsupportedFeature("this export has no VAE decoder; re-export with the vae_decoder component")
        image = self.decoder_session(latent=latents)["image"].to(self.dtype)
        if not return_dict:
            return (image,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=image)

    def encode(self, images: torch.Tensor, return_dict: bool = True) -> Any:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if self.encoder_session is None:
            raise UnsupportedFeature("this export has no VAE encoder; re-export with the vae_encoder component for img2img")
        moments = self.encoder_session(image=images)["moments"].to(self.dtype)
        posterior = DiagonalGaussianDistribution(moments)
        if not return_dict:
            return (posterior,)
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        return AutoencoderKLOutput(latent_dist=posterior)


class _TextModel(torch.nn.Module):
    """What A1111's clip skip needs of ``text_model``: its final layer norm (kept in torch; it is tiny)."""

    def __init__(self, final_layer_norm: torch.nn.Module) -> None:
        super().__init__()
        self.final_layer_norm = final_layer_norm


class ExportedTextEncoder(ExportedComponent):
    """A CLIP text encoder as a session, returning what transformers' CLIP models return."""

    def __init__(self, original: torch.nn.Module, session: Session, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(original.config, session, dtype, device)
        import copy

        # transformers 5's CLIPTextModel holds the norm directly, CLIPTextModelWithProjection under .text_model
        norm = getattr(original, "final_layer_norm", None) or original.text_model.final_layer_norm
        self.final_layer_norm = copy.deepcopy(norm)
        if hasattr(original, "text_model"):
            self.text_model = _TextModel(self.final_layer_norm)
        self.projected = hasattr(original, "text_projection")

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False, **unsupported: Any) -> Any:
        used = {k: v for k, v in unsupported.items() if v is not None and k != "return_dict"}
        if used:
            raise UnsupportedFeature(f"the exported text encoder does not take {', '.join(sorted(used))}")
        out = self.session(input_ids=input_ids.long())
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.clip.modeling_clip import CLIPTextModelOutput

        last, pooled = out["last_hidden_state"].to(self.dtype), out["pooled"].to(self.dtype)
        hidden = tuple(out["hidden_states"].to(self.dtype).unbind(0)) if output_hidden_states else None
        if self.projected:
            return CLIPTextModelOutput(text_embeds=pooled, last_hidden_state=last, hidden_states=hidden)
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden)


def install_sessions(model: LatentDiffusionModel, sessions: Mapping[str, Any]) -> None:
    """Replace ``model``'s networks by stand-ins around ``sessions`` (anything with the
    :class:`Session` interface). Components that were not exported stay in torch.
    """
    torch_modules = model.modules()
    unet = ExportedUNet(model.unet, sessions["unet"], model.dtype, model.device)
    model.unet = unet
    model.unet_call = lambda latents, t, embeds, **kwargs: unet.call(
        latents, t, embeds, kwargs.pop("added_cond_kwargs", None),
        kwargs.pop("down_block_additional_residuals", None), kwargs.pop("mid_block_additional_residual", None),
        **_no_more(kwargs),
    )
    vae_sessions = [sessions.get("vae_decoder"), sessions.get("vae_encoder")]
    if all(vae_sessions):
        vae = ExportedVae(model.vae, *vae_sessions, model.dtype, model.device)
        model.vae = vae
        model.vae_decode_call = lambda latents: vae.decode(latents, return_dict=False)[0]
        model.vae_encode_call = lambda images: vae.encode(images, return_dict=False)[0].mode()
    elif any(vae_sessions):  # half the VAE exported: keep the torch module for the other half
        partial = ExportedVae(model.vae, *vae_sessions, model.dtype, model.device)
        if vae_sessions[0]:
            model.vae_decode_call = lambda latents: partial.decode(latents, return_dict=False)[0]
        else:
            model.vae_encode_call = lambda images: partial.encode(images, return_dict=False)[0].mode()
    for name, session in sessions.items():
        if name.startswith("text_encoder"):
            setattr(model, name, ExportedTextEncoder(torch_modules[name], session, model.dtype, model.device))


def _no_more(kwargs: dict[str, Any]) -> dict[str, Any]:
    used = {k: v for k, v in kwargs.items() if v is not None}
    if used:
        raise UnsupportedFeature(f"the exported UNet does not take {', '.join(sorted(used))}; use the torch runtime for that")
    return {}


class ExportedControlNet(ExportedComponent):
    """An exported ControlNet as a session, called like diffusers' ``ControlNetModel``."""

    def __init__(self, key: str, entry: Mapping[str, Any], session: Session, dtype: torch.dtype,
                 device: torch.device) -> None:
        from diffusers.configuration_utils import FrozenDict

        super().__init__(FrozenDict(entry["config"]), session, dtype, device)
        self.key = key
        self.source = dict(entry["source"])
        self.residual_names = list(session.outputs)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        return_dict: bool = True,
        **unsupported: Any,
    ) -> Any:
        used = {k: v for k, v in unsupported.items() if v is not None and v is not False}
        if used:
            raise UnsupportedFeature(
                f"the exported ControlNet {self.key!r} does not take {', '.join(sorted(used))}; scale its residuals "
                "afterwards, or use the torch runtime"
            )
        batch = sample.shape[0]
        t = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1).expand(batch)
        out = self.session(sample=sample, timestep=t, encoder_hidden_states=encoder_hidden_states,
                           controlnet_cond=controlnet_cond)
        residuals = [out[name].to(self.dtype) for name in self.residual_names]
        down, mid = tuple(residuals[:-1]), residuals[-1]
        if not return_dict:
            return down, mid
        from diffusers.models.controlnets.controlnet import ControlNetOutput

        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)


class ExportedControlNets:
    """What the ControlNet adapter asks when a unit loads a ControlNet (see
    :func:`aipaint.plugin.kit.controlnets.use_runtime_controlnets`).

    The exported ControlNet whose source file the unit names is returned; a name alone
    never matches, because a different file of the same name would give other images. A
    ControlNet that is not in the export gives ``None`` (it runs in torch), or an error
    with ``torch_controlnets=False``.
    """

    def __init__(self, manifest: Manifest, stand_ins: Mapping[str, ExportedControlNet], torch_controlnets: bool,
                 runtime: str, reexport: str) -> None:
        self.root = manifest.root
        self.stand_ins = dict(stand_ins)
        self.torch_controlnets = torch_controlnets
        self.runtime = runtime  # for messages: "ONNX Runtime", "OpenVINO"
        self.reexport = reexport  # the command that adds a ControlNet, with {root}

    def __call__(self, ref: Any, config: Path | None) -> ExportedControlNet | None:
        for stand_in in self.stand_ins.values():
            if controlnet_source_matches(stand_in.source, ref, config):
                return stand_in
        if self.torch_controlnets:
            return None
        exported = ", ".join(f"{s.source['name']!r}" for s in self.stand_ins.values()) or "none"
        if ref.module is not None:
            why = "it was given as a ControlNetModel object, which has no file to recognise it by; name it instead"
        elif any(s.source["name"].lower() == ref.name.lower() for s in self.stand_ins.values()):
            why = "the export holds a ControlNet of that name, but made from another file or config"
        else:
            why = "it is not in the export"
        raise UnsupportedFeature(
            f"ControlNet {ref.name!r} cannot run through {self.runtime}: {why} (exported: {exported}); re-export with "
            f"`{self.reexport.format(root=self.root)}`, or set the runtime option "
            "torch_controlnets=true to run such ControlNets in torch"
        )


def check_controlnets_fit(manifest: Manifest) -> None:
    """Each exported ControlNet must produce exactly the residuals the exported UNet takes."""
    unet_residuals = [(io["name"], io["shape"]) for io in manifest.io("unet", "inputs") if "residual" in io["name"]]
    for key in manifest.controlnets:
        outputs = [(io["name"], io["shape"]) for io in manifest.io(CONTROLNET_PREFIX + key, "outputs")]
        if not unet_residuals:
            problem = "the UNet was exported without ControlNet inputs"
        elif outputs != unet_residuals:
            problem = f"it makes the residuals {outputs}, the UNet takes {unet_residuals}"
        else:
            continue
        raise ModelLoadError(f"{manifest.root}: the exported ControlNet {key!r} does not fit the exported UNet ({problem}); "
                             f"{manifest.hint}")


def install_exported(model: LatentDiffusionModel, manifest: Manifest, sessions: Mapping[str, Any], *,
                     torch_controlnets: bool, runtime: str, reexport: str) -> None:
    """:func:`install_sessions` for the manifest's components, and its ControlNets as stand-ins the ControlNet
    adapter asks for (``sessions`` holds one per :attr:`Manifest.entries` name; see :class:`ExportedControlNets`
    for ``torch_controlnets``, ``runtime`` and ``reexport``)."""
    from aipaint.plugin.kit.controlnets import use_runtime_controlnets

    controlnets = {
        key: ExportedControlNet(key, entry, sessions[CONTROLNET_PREFIX + key], model.dtype, model.device)
        for key, entry in manifest.controlnets.items()
    }
    install_sessions(model, {name: sessions[name] for name in manifest.components})
    use_runtime_controlnets(model, ExportedControlNets(manifest, controlnets, torch_controlnets, runtime, reexport))
