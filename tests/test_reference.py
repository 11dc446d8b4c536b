"""Style from a reference image (plugins/reference): IP-Adapter plumbing against diffusers' own
pipeline on tiny random weights, the weight-free reference-only mode, options, infotext, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aipaint.errors import InvalidParameter, MissingWeights, ModelLoadError

KW = {"steps": 4, "width": 32, "height": 32, "seed": 3, "cfg_scale": 7.0}


def _reference_image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    a = np.zeros((32, 32, 3), np.uint8)
    a[:] = (20, 40, 200)
    a[8:24, 8:24] = (230, 200, 0)
    a = np.clip(a.astype(int) + rng.integers(-20, 20, a.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def _unit(**options):
    from aipaint_plugins.reference import reference_unit

    options.setdefault("image", _reference_image())
    return reference_unit(**options)


def _latents(pipe, *units, prompt: str = "a red square", **kw):
    """The loop's final latents (more precise than 8-bit images for equality checks)."""
    from aipaint.api.request import GenerationRequest

    return pipe.generate(GenerationRequest(prompt=prompt, adapters=tuple(units), **{**KW, **kw})).latents


# --------------------------------------------------------------------------- IP-Adapter fixtures
VISION_HIDDEN, PROJECTION = 32, 16


def _save_image_encoder(folder: Path) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(5)
    config = CLIPVisionConfig(hidden_size=VISION_HIDDEN, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              image_size=224, patch_size=32, projection_dim=PROJECTION)
    CLIPVisionModelWithProjection(config).eval().save_pretrained(folder, safe_serialization=True)
    return folder


def _ip_adapter_layers(unet) -> list[tuple[int, int]]:
    """(key id, hidden size) of each cross-attention layer in the published files' numbering."""
    layers, key_id = [], 1
    for name in unet.attn_processors:
        if not name.endswith("attn1.processor"):
            module = unet.get_submodule(name[: -len(".processor")])
            layers.append((key_id, module.to_q.in_features))
            key_id += 2
    return layers


def _ip_adapter_tensors(unet, *, plus: bool, seed: int) -> dict[str, torch.Tensor]:
    """A random IP-Adapter in h94/IP-Adapter's key layout (plain: ImageProjection; plus: Resampler)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    cross = unet.config.cross_attention_dim
    tensors: dict[str, torch.Tensor] = {}
    if plus:
        dim, queries, inner = 64, 4, 64
        tensors.update({"image_proj.latents": rand(1, queries, dim), "image_proj.proj_in.weight": rand(dim, VISION_HIDDEN),
                        "image_proj.proj_in.bias": rand(dim), "image_proj.proj_out.weight": rand(cross, dim),
                        "image_proj.proj_out.bias": rand(cross), "image_proj.norm_out.weight": 1 + rand(cross),
                        "image_proj.norm_out.bias": rand(cross)})
        for i in range(4):
            p = f"image_proj.layers.{i}"
            tensors.update({f"{p}.0.norm1.weight": 1 + rand(dim), f"{p}.0.norm1.bias": rand(dim),
                            f"{p}.0.norm2.weight": 1 + rand(dim), f"{p}.0.norm2.bias": rand(dim),
                            f"{p}.0.to_q.weight": rand(inner, dim), f"{p}.0.to_kv.weight": rand(2 * inner, dim),
                            f"{p}.0.to_out.weight": rand(dim, inner), f"{p}.1.0.weight": 1 + rand(dim),
                            f"{p}.1.0.bias": rand(dim), f"{p}.1.1.weight": rand(4 * dim, dim), f"{p}.1.3.weight": rand(dim, 4 * dim)})
    else:
        tensors.update({"image_proj.proj.weight": rand(4 * cross, PROJECTION), "image_proj.proj.bias": rand(4 * cross),
                        "image_proj.norm.weight": 1 + rand(cross), "image_proj.norm.bias": rand(cross)})
    for key_id, hidden in _ip_adapter_layers(unet):
        tensors[f"ip_adapter.{key_id}.to_k_ip.weight"] = rand(hidden, cross)
        tensors[f"ip_adapter.{key_id}.to_v_ip.weight"] = rand(hidden, cross)
    return tensors


@pytest.fixture(scope="module")
def ip_files(tmp_path_factory, tiny_pipe) -> dict[str, Path]:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("ip-adapter")
    files = {"encoder": _save_image_encoder(root / "image_encoder")}
    for kind, plus in (("plain", False), ("plus", True)):
        path = root / f"ip-adapter-{kind}-tiny.safetensors"
        save_file(_ip_adapter_tensors(tiny_pipe.model.unet, plus=plus, seed=11 + plus), str(path))
        files[kind] = path
    return files


@pytest.mark.parametrize("kind", ["plain", "plus"])
def test_ip_adapter_matches_diffusers_pipeline(tiny_pipe, tiny_sd_path, ip_files, kind):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    image = _reference_image()
    unit = _unit(image=image, mode="ip-adapter", model=ip_files[kind], image_encoder=str(ip_files["encoder"]), weight=0.8)
    ours = tiny_pipe.txt2img("a red square", "blue", adapters=(unit,), batch_size=2, **KW)

    ref = StableDiffusionPipeline.from_pretrained(
        tiny_sd_path, safety_checker=None, requires_safety_checker=False,
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(ip_files["encoder"]),
        feature_extractor=CLIPImageProcessor(),
    )
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(ip_files[kind].parent), subfolder="", weight_name=ip_files[kind].name, image_encoder_folder=None)
    ref.set_ip_adapter_scale(0.8)
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    theirs = ref("a red square", negative_prompt="blue", ip_adapter_image=image, num_inference_steps=4, guidance_scale=7,
                 generator=generators, height=32, width=32, num_images_per_prompt=2, output_type="pil").images
    ours_a = np.stack([np.asarray(i, np.float32) / 255 for i in ours.images])
    theirs_a = np.stack([np.asarray(i, np.float32) / 255 for i in theirs])
    assert np.abs(ours_a - theirs_a).mean() < 1e-3
    # the adapter matters here: without it the pictures differ by far more than the tolerance
    plain = tiny_pipe.txt2img("a red square", "blue", batch_size=2, **KW)
    assert np.abs(np.stack([np.asarray(i, np.float32) / 255 for i in plain.images]) - theirs_a).mean() > 1e-2
    assert "Reference 0: \"Mode: ip-adapter, Weight: 0.8" in ours.parameters
    assert f"Model: {ip_files[kind].stem}" in ours.parameters


def test_ip_adapter_leaves_the_unet_as_it_was(tiny_pipe, ip_files):
    unet = tiny_pipe.model.unet
    before = _latents(tiny_pipe)
    processors = {k: type(v) for k, v in unet.attn_processors.items()}
    unit = _unit(mode="ip-adapter", model=ip_files["plus"], image_encoder=str(ip_files["encoder"]))
    assert not torch.equal(_latents(tiny_pipe, unit), before)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == processors
    assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None
    assert torch.equal(_latents(tiny_pipe), before)


def test_ip_adapter_without_cfg_and_with_two_adapters(tiny_pipe, ip_files):
    encoder = str(ip_files["encoder"])
    one = _unit(mode="ip-adapter", model=ip_files["plain"], image_encoder=encoder)
    two = _unit(mode="ip-adapter", model=ip_files["plus"], image_encoder=encoder, weight=0.5)
    both = _latents(tiny_pipe, one, two)
    assert not torch.equal(both, _latents(tiny_pipe, one))
    zero = _unit(mode="ip-adapter", model=ip_files["plus"], image_encoder=encoder, weight=0.0)
    torch.testing.assert_close(_latents(tiny_pipe, one, zero), _latents(tiny_pipe, one))
    assert _latents(tiny_pipe, one, cfg_scale=1.0).shape == both.shape  # no negative rows: embeddings line up


def test_ip_adapter_for_another_model_is_refused(tiny_pipe, ip_files, tmp_path):
    from safetensors.torch import save_file

    wide = {k: (torch.zeros(v.shape[0], 768) if k.startswith("ip_adapter.") else v)
            for k, v in _ip_adapter_tensors(tiny_pipe.model.unet, plus=False, seed=1).items()}
    path = tmp_path / "sd15-sized.safetensors"
    save_file(wide, str(path))
    with pytest.raises(ModelLoadError, match="text width of 768"):
        tiny_pipe.txt2img("x", adapters=(_unit(mode="ip-adapter", model=path, image_encoder=str(ip_files["encoder"])),), **KW)
    save_file({"something.else": torch.zeros(2)}, str(path))
    with pytest.raises(ModelLoadError, match="not an IP-Adapter file"):
        tiny_pipe.txt2img("x", adapters=(_unit(mode="ip-adapter", model=path, image_encoder=str(ip_files["encoder"])),), **KW)


def test_hub_weights_fail_offline_with_a_clear_message(tiny_pipe, offline, tmp_path, monkeypatch):
    monkeypatch.setenv("AIPAINT_IP_ADAPTER_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(MissingWeights) as error:
        tiny_pipe.txt2img("x", adapters=(_unit(mode="ip-adapter", model="h94/IP-Adapter/models/ip-adapter_sd15.safetensors"),),
                          **KW)
    message = str(error.value)
    assert "h94/IP-Adapter/models/ip-adapter_sd15.safetensors" in message
    assert "hf download h94/IP-Adapter models/ip-adapter_sd15.safetensors" in message
    assert str(tmp_path / "models" / "ip-adapter_sd15.safetensors") in message


def test_default_weights_follow_the_text_width_and_local_copies_come_first(tmp_path, monkeypatch, offline):
    from aipaint_plugins.reference.ip_adapter import encoder_for, resolve_encoder, resolve_weights

    monkeypatch.setenv("AIPAINT_IP_ADAPTER_DIR", str(tmp_path))
    for relative in ("models/ip-adapter_sd15.safetensors", "sdxl_models/ip-adapter_sdxl.safetensors"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    assert resolve_weights(None, 768, 0) == ("h94/IP-Adapter/models/ip-adapter_sd15.safetensors",
                                             tmp_path / "models/ip-adapter_sd15.safetensors",
                                             "models/ip-adapter_sd15.safetensors")
    assert resolve_weights(None, 2048, 0)[2] == "sdxl_models/ip-adapter_sdxl.safetensors"
    assert encoder_for("sdxl_models/ip-adapter_sdxl.safetensors") == "sdxl_models/image_encoder"
    assert encoder_for("sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors") == "models/image_encoder"
    assert encoder_for("models/ip-adapter-plus_sd15.safetensors") == "models/image_encoder"
    (tmp_path / "models/image_encoder").mkdir()
    assert resolve_encoder(None, "models/ip-adapter_sd15.safetensors", Path("x"), 0)[1] == tmp_path / "models/image_encoder"
    with pytest.raises(InvalidParameter, match="cross-attention width 32"):
        resolve_weights(None, 32, 0)
    with pytest.raises(InvalidParameter):
        resolve_weights("../outside", 768, 0)


# --------------------------------------------------------------------------- reference-only
def test_shared_attention_over_identical_tokens_is_plain_attention(tiny_pipe):
    """Appending a copy of a layer's own tokens to its keys and values leaves softmax attention
    unchanged: the read path concatenates the right tensors in the right place."""
    from aipaint_plugins.reference.attention import AttentionState, ReferenceAttnProcessor

    unet = tiny_pipe.model.unet
    name = next(n for n in unet.attn_processors if n.endswith("attn1.processor"))
    attn = unet.get_submodule(name[: -len(".processor")])
    inner = unet.attn_processors[name]
    state = AttentionState(style_fidelity=0.0)
    processor = ReferenceAttnProcessor(inner, state, 0.0)
    x = torch.randn(2, 16, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plain = inner(attn, x)
        state.phase = "write"
        processor(attn, x)
        state.phase = "read"
        shared = processor(attn, x)
        processor.bank = torch.randn_like(x)
        other = processor(attn, x)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    assert (other - plain).abs().max() > 1e-3


def test_reference_only_changes_the_result_and_is_undone(tiny_pipe):
    unet = tiny_pipe.model.unet
    before = _latents(tiny_pipe)
    call = tiny_pipe.model.unet_call
    processors = dict(unet.attn_processors)
    changed = _latents(tiny_pipe, _unit())
    assert not torch.equal(changed, before)
    assert dict(unet.attn_processors) == processors and tiny_pipe.model.unet_call == call
    assert torch.equal(_latents(tiny_pipe), before)
    torch.testing.assert_close(_latents(tiny_pipe, _unit()), changed)  # its own noise is seeded: reproducible


@pytest.mark.parametrize("mode", ["reference-only", "reference-adain", "reference-adain+attn"])
def test_weight_zero_and_an_empty_window_do_nothing(tiny_pipe, mode):
    before = _latents(tiny_pipe)
    torch.testing.assert_close(_latents(tiny_pipe, _unit(mode=mode, weight=0.0)), before)
    torch.testing.assert_close(_latents(tiny_pipe, _unit(mode=mode, guidance_start=1.0, guidance_end=1.0)), before)
    assert not torch.equal(_latents(tiny_pipe, _unit(mode=mode)), before)


def test_style_fidelity_and_layers_matter(tiny_pipe):
    half = _latents(tiny_pipe, _unit(style_fidelity=0.5))
    assert not torch.equal(half, _latents(tiny_pipe, _unit(style_fidelity=1.0)))
    assert not torch.equal(half, _latents(tiny_pipe, _unit(style_fidelity=0.5, weight=0.3)))
    # the control mode overrides the fidelity as in sd-webui-controlnet
    torch.testing.assert_close(_latents(tiny_pipe, _unit(control_mode="ControlNet is more important")),
                               _latents(tiny_pipe, _unit(style_fidelity=1.0)))


def test_reference_only_with_ip_adapter_and_batches(tiny_pipe, ip_files):
    ip = _unit(mode="ip-adapter", model=ip_files["plain"], image_encoder=str(ip_files["encoder"]))
    both = _latents(tiny_pipe, ip, _unit(), batch_size=2)
    assert both.shape[0] == 2
    assert not torch.equal(both, _latents(tiny_pipe, ip, batch_size=2))
    assert _latents(tiny_pipe, _unit(), skip_early_cfg=0.5).shape[0] == 1


@pytest.mark.parametrize(("options", "error"), [
    ({"weight": 3}, "Reference 0 weight"),
    ({"style_fidelity": -0.1}, "Reference 0 style_fidelity"),
    ({"mode": "sticker"}, "Reference 0 mode"),
    ({"guidance_start": 0.8, "guidance_end": 0.2}, "must not exceed guidance_end"),
    ({"colour": "red"}, "valid options are"),
    ({"model": "x"}, "uses no weights"),
    ({"image": None}, "is required"),
])
def test_bad_options_are_typed_errors(tiny_pipe, options, error):
    with pytest.raises(InvalidParameter, match=error):
        tiny_pipe.txt2img("x", adapters=(_unit(**options),), **KW)


def test_a1111_unit_names_are_accepted(tiny_pipe):
    from aipaint.plugin.adapters import AdapterUnit

    a1111 = AdapterUnit("reference", {"module": "reference_only", "image": _reference_image(), "threshold_a": 0.7})
    torch.testing.assert_close(_latents(tiny_pipe, a1111), _latents(tiny_pipe, _unit(style_fidelity=0.7)))


# --------------------------------------------------------------------------- behaviour on the embedded model
def test_reference_background_carries_over_on_the_embedded_model(embedded_pipe):
    """A black-background reference makes a shape-only prompt's pictures dark far more often than
    without it (the embedded model draws those prompts on gray; benchmarks/reference_style.py)."""
    from aipaint_plugins.shapes_world.evaluate import read_scene
    from aipaint_plugins.shapes_world.render import render
    from aipaint_plugins.shapes_world.scene import POSITIONS, Scene, SceneObject

    reference = render(Scene("black", (SceneObject("square", "green", "big", "center", *POSITIONS["center"], 13.0),)))
    counts = {}
    for label, units in (("without", ()), ("with", (_unit(image=reference, style_fidelity=1.0),))):
        images = embedded_pipe.txt2img("a circle", seed=1, batch_size=6, steps=12, adapters=units).images
        counts[label] = sum(read_scene(i).background == "black" for i in images)
    assert counts["with"] >= counts["without"] + 2, counts


@pytest.fixture(scope="module")
def embedded_pipe():
    import aipaint

    return aipaint.load()


# --------------------------------------------------------------------------- CLI and PNG
def test_cli_generates_with_a_reference_and_from_png_reproduces_it(tiny_sd_path, tmp_path, capsys):
    from aipaint.cli.main import main

    reference = tmp_path / "style.png"
    _reference_image().save(reference)
    first = tmp_path / "first.png"
    common = ["-m", str(tiny_sd_path), "--no-progress"]
    assert main(["generate", "a red square", "--steps", "3", "-W", "32", "-H", "32", "--seed", "5", "--reference",
                 str(reference), "--reference-weight", "0.9", "--reference-option", "style_fidelity=0.8",
                 "-o", str(first), *common]) == 0
    params = Image.open(first).info["parameters"]
    assert "Reference 0: \"Mode: reference-only, Weight: 0.9, Style Fidelity: 0.8" in params
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(first), "--reference", str(reference), "-o", str(again), *common]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    plain = tmp_path / "plain.png"
    assert main(["generate", "a red square", "--steps", "3", "-W", "32", "-H", "32", "--seed", "5", "-o", str(plain),
                 *common]) == 0
    assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(plain)))
    capsys.readouterr()
    assert main(["generate", "a red square", "--reference-weight", "0.5", "-o", str(tmp_path / "x.png"), *common]) == 2
    assert "need --reference IMAGE" in capsys.readouterr().err


def test_added_inputs_from_a_contributor_join_the_family_extras():
    """SDXL passes pooled embeddings and time ids as added_cond_kwargs; IP-Adapter's image_embeds
    must reach the UNet beside them, not replace them (or be replaced)."""
    from aipaint.models.latent import Conditioning, LatentDiffusionModel

    model = LatentDiffusionModel.__new__(LatentDiffusionModel)
    seen = {}
    model.unet_call = lambda latents, t, embeds, **kwargs: seen.update(kwargs) or latents
    cond = Conditioning(torch.zeros(1, 2, 3), {"text_embeds": torch.ones(1, 4), "time_ids": torch.ones(1, 6)})
    model.predict(torch.zeros(1, 4, 2, 2), torch.tensor(1), cond, added_cond_kwargs={"image_embeds": [torch.ones(1, 1, 8)]})
    assert set(seen["added_cond_kwargs"]) == {"text_embeds", "time_ids", "image_embeds"}


def test_ip_adapter_on_sdxl_matches_diffusers_pipeline(tmp_path, plugin_host):
    """SDXL's added inputs (pooled embeddings, time ids) and IP-Adapter's image_embeds reach the UNet together."""
    from aipaint_plugins.shapes_world.clip_tokenizer import build_clip_tokenizer
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from safetensors.torch import save_file
    from test_sdxl import build_tiny_sdxl_components
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    import aipaint

    components = build_tiny_sdxl_components(0, tokenizer=build_clip_tokenizer())
    StableDiffusionXLPipeline(**components).save_pretrained(tmp_path / "base")
    encoder = _save_image_encoder(tmp_path / "image_encoder")
    weights = tmp_path / "ip-adapter-sdxl-tiny.safetensors"
    save_file(_ip_adapter_tensors(components["unet"], plus=False, seed=3), str(weights))
    image = _reference_image(1)

    pipe = aipaint.load(tmp_path / "base", host=plugin_host)
    unit = _unit(image=image, mode="ip-adapter", model=weights, image_encoder=str(encoder))
    ours = pipe.txt2img("a red square", "blue", adapters=(unit,), sampler="Euler", steps=3, cfg_scale=5.0, seed=7,
                        width=32, height=32)
    ref = StableDiffusionXLPipeline.from_pretrained(tmp_path / "base", local_files_only=True,
                                                    image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoder),
                                                    feature_extractor=CLIPImageProcessor())
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(tmp_path), subfolder="", weight_name=weights.name, image_encoder_folder=None)
    theirs = ref("a red square", negative_prompt="blue", ip_adapter_image=image, num_inference_steps=3, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(7), width=32, height=32, output_type="np").images[0]
    ours_a = np.asarray(ours.image, np.float64) / 255
    assert np.abs(ours_a - np.round(theirs * 255) / 255).mean() < 1e-3
    plain = pipe.txt2img("a red square", "blue", sampler="Euler", steps=3, cfg_scale=5.0, seed=7, width=32, height=32)
    assert np.abs(np.asarray(plain.image, np.float64) / 255 - ours_a).mean() > 1e-2


def test_reference_works_in_img2img(tiny_pipe):
    init = _reference_image(3)
    plain = tiny_pipe.img2img(init, "a red square", denoising_strength=0.7, **KW)
    styled = tiny_pipe.img2img(init, "a red square", denoising_strength=0.7, adapters=(_unit(),), **KW)
    assert "Reference 0" in styled.parameters
    assert np.abs(np.asarray(plain.image, np.float32) - np.asarray(styled.image, np.float32)).mean() > 0.5
