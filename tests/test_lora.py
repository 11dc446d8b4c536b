"""LoRA: file formats → patches, reversible application, the folder's safety rules, generation, infotext."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from aipaint_plugins.lora.api import LoraUse, UnmatchedLoraKeys, apply_loras, lora_patches
from aipaint_plugins.lora.formats import canonical_path, kohya_key, patchable_modules
from safetensors.torch import save_file

from aipaint.errors import AipaintWarning, InvalidParameter, ModelLoadError, UnsafeFileError
from aipaint.infotext import Infotext, read_png_parameters
from aipaint.plugin.adapters import AdapterUnit
from aipaint.plugin.kit.folders import ModelFolder, NameOutsideFolder

Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear 64 -> 64
V2 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"  # Linear 32 -> 64 (reads the text)
CONV = "down_blocks.1.resnets.0.conv1"  # Conv2d 32 -> 64, 3x3
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"  # Linear 32 -> 32
GEN = dict(seed=3, width=32, height=32, steps=2, cfg_scale=5.0)


def weight(pipe, component: str, path: str) -> torch.Tensor:
    modules = patchable_modules(getattr(pipe.model, component))
    # transformers 5 has no text_model level; LoRA files (and these tests) still name it.
    return (modules.get(path) or modules[path.removeprefix("text_model.")]).weight


def snapshot(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{c}.{canonical_path(c, k)}": v.detach().clone()
        for c in ("unet", "text_encoder")
        for k, v in getattr(pipe.model, c).state_dict().items()
    }


def assert_bit_identical(pipe, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(pipe)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"weights not restored: {changed[:3]}"


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


def lowrank(out: int, inp: int, rank: int, seed: int, *, conv: tuple[int, int] | None = None):
    g = torch.Generator().manual_seed(seed)
    down_shape = (rank, inp, *conv) if conv else (rank, inp)
    up_shape = (out, rank, 1, 1) if conv else (out, rank)
    return torch.randn(up_shape, generator=g) * 0.5, torch.randn(down_shape, generator=g) * 0.5


def kohya_group(component: str, path: str, up, down, alpha: float | None) -> dict[str, torch.Tensor]:
    base = kohya_key(component, path)
    group = {f"{base}.lora_up.weight": up, f"{base}.lora_down.weight": down}
    if alpha is not None:
        group[f"{base}.alpha"] = torch.tensor(alpha)
    return group


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "loras"
    root.mkdir()
    return root


@pytest.fixture()
def kohya_file(folder: Path):
    """A kohya LoRA on a UNet linear, a UNet 3x3 conv (LoCon) and a text-encoder linear."""
    parts = {
        "q": (*lowrank(64, 64, 4, 1), 2.0),
        "conv": (*lowrank(64, 32, 2, 2, conv=(3, 3)), 1.0),
        "te": (*lowrank(32, 32, 4, 3), 8.0),
    }
    state = {}
    state.update(kohya_group("unet", Q, *parts["q"]))
    state.update(kohya_group("unet", CONV, *parts["conv"]))
    state.update(kohya_group("text_encoder", TE_Q, *parts["te"]))
    save_file(state, str(folder / "style.safetensors"))
    return parts


def test_kohya_names_are_the_module_paths_with_underscores():
    assert kohya_key("unet", Q) == "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert kohya_key("text_encoder", TE_Q) == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def test_kohya_patch_is_w_plus_weight_scale_up_down_and_unload_is_bit_identical(tiny_pipe, folder, kohya_file):
    before = snapshot(tiny_pipe)
    up, down, alpha = kohya_file["q"]
    cup, cdown, calpha = kohya_file["conv"]
    tup, tdown, talpha = kohya_file["te"]
    with apply_loras(tiny_pipe, [LoraUse("style", 0.7, te_weight=-0.3)], folder=folder):
        expected_q = before[f"unet.{Q}.weight"] + 0.7 * (alpha / 4) * (up @ down)
        torch.testing.assert_close(weight(tiny_pipe, "unet", Q), expected_q, rtol=1e-5, atol=1e-5)
        conv_delta = (cup.flatten(1) @ cdown.flatten(1)).reshape(64, 32, 3, 3)
        expected_conv = before[f"unet.{CONV}.weight"] + 0.7 * (calpha / 2) * conv_delta
        torch.testing.assert_close(weight(tiny_pipe, "unet", CONV), expected_conv, rtol=1e-5, atol=1e-5)
        expected_te = before[f"text_encoder.{TE_Q}.weight"] - 0.3 * (talpha / 4) * (tup @ tdown)
        torch.testing.assert_close(weight(tiny_pipe, "text_encoder", TE_Q), expected_te, rtol=1e-5, atol=1e-5)
    assert_bit_identical(tiny_pipe, before)


def test_peft_format_with_diffusers_alpha_metadata(tiny_pipe, folder):
    before = snapshot(tiny_pipe)
    up, down = lowrank(64, 32, 4, 5)
    tup, tdown = lowrank(32, 32, 2, 6)
    state = {
        f"unet.{V2}.lora_A.weight": down,
        f"unet.{V2}.lora_B.weight": up,
        f"text_encoder.{TE_Q}.lora_A.weight": tdown,
        f"text_encoder.{TE_Q}.lora_B.weight": tup,
    }
    metadata = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "text_encoder.r": 2,
                                                     "text_encoder.lora_alpha": 1})}
    save_file(state, str(folder / "peft.safetensors"), metadata=metadata)
    with apply_loras(tiny_pipe, [("peft", 1.0)], folder=folder):
        torch.testing.assert_close(weight(tiny_pipe, "unet", V2), before[f"unet.{V2}.weight"] + 2.0 * up @ down)
        torch.testing.assert_close(
            weight(tiny_pipe, "text_encoder", TE_Q), before[f"text_encoder.{TE_Q}.weight"] + 0.5 * tup @ tdown
        )
    assert_bit_identical(tiny_pipe, before)


def test_peft_without_alpha_has_scale_one_and_accepts_adapter_names(tiny_pipe, folder):
    before = snapshot(tiny_pipe)
    up, down = lowrank(64, 64, 4, 7)
    save_file({f"base_model.model.{Q}.lora_A.default.weight": down, f"base_model.model.{Q}.lora_B.default.weight": up},
              str(folder / "bare.safetensors"))
    with apply_loras(tiny_pipe, ["bare"], folder=folder):
        torch.testing.assert_close(weight(tiny_pipe, "unet", Q), before[f"unet.{Q}.weight"] + up @ down)
    assert_bit_identical(tiny_pipe, before)


def test_several_loras_sum(tiny_pipe, folder):
    before = snapshot(tiny_pipe)
    up1, down1 = lowrank(64, 64, 4, 11)
    up2, down2 = lowrank(64, 64, 2, 12)
    save_file(kohya_group("unet", Q, up1, down1, 4.0), str(folder / "a.safetensors"))
    save_file(kohya_group("unet", Q, up2, down2, 1.0), str(folder / "b.safetensors"))
    with apply_loras(tiny_pipe, [("a", 0.5), ("b", -2.0)], folder=folder):
        expected = before[f"unet.{Q}.weight"] + 0.5 * (up1 @ down1) - 2.0 * 0.5 * (up2 @ down2)
        torch.testing.assert_close(weight(tiny_pipe, "unet", Q), expected, rtol=1e-5, atol=1e-5)
    assert_bit_identical(tiny_pipe, before)


def test_loha_and_lokr_differences(tiny_pipe, folder):
    before = snapshot(tiny_pipe)
    g = torch.Generator().manual_seed(21)
    w1a, w1b, w2a, w2b = (torch.randn(s, generator=g) * 0.3 for s in ((64, 3), (3, 64), (64, 3), (3, 64)))
    loha = {f"{kohya_key('unet', Q)}.{k}": v for k, v in
            {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": torch.tensor(1.5)}.items()}
    save_file(loha, str(folder / "loha.safetensors"))
    k1 = torch.randn(8, 4, generator=g)
    k2a, k2b = torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g)
    lokr = {f"{kohya_key('unet', V2)}.{k}": v for k, v in
            {"lokr_w1": k1, "lokr_w2_a": k2a, "lokr_w2_b": k2b, "alpha": torch.tensor(1.0)}.items()}
    save_file(lokr, str(folder / "lokr.safetensors"))
    with apply_loras(tiny_pipe, [("loha", 1.0), ("lokr", 0.5)], folder=folder):
        hadamard = (w1a @ w1b) * (w2a @ w2b) * (1.5 / 3)
        torch.testing.assert_close(weight(tiny_pipe, "unet", Q), before[f"unet.{Q}.weight"] + hadamard, rtol=1e-5, atol=1e-5)
        w2 = k2a @ k2b
        kron = (k1[:, None, :, None] * w2[None, :, None, :]).reshape(64, 32)  # Kronecker product, written out
        torch.testing.assert_close(
            weight(tiny_pipe, "unet", V2), before[f"unet.{V2}.weight"] + 0.5 * (1.0 / 2) * kron, rtol=1e-5, atol=1e-5
        )
    assert_bit_identical(tiny_pipe, before)


def test_unmatched_keys_are_reported_not_dropped(tiny_pipe, folder):
    up, down = lowrank(64, 64, 4, 31)
    state = kohya_group("unet", Q, up, down, 4.0)
    state["lora_unet_no_such_block_to_q.lora_down.weight"] = down.clone()
    state["lora_unet_no_such_block_to_q.lora_up.weight"] = up.clone()
    state[f"{kohya_key('unet', Q)}.dora_scale"] = torch.ones(64, 1)
    wrong_shape_up, wrong_shape_down = lowrank(10, 10, 2, 32)
    state.update(kohya_group("unet", V2, wrong_shape_up, wrong_shape_down, None))
    save_file(state, str(folder / "partial.safetensors"))
    with pytest.warns(UnmatchedLoraKeys, match="5 key"):
        patches = lora_patches(tiny_pipe.model, folder / "partial.safetensors")
    assert [p.module for p in patches.patches] == [Q]
    assert set(patches.unmatched) == {
        "lora_unet_no_such_block_to_q.lora_down.weight",
        "lora_unet_no_such_block_to_q.lora_up.weight",
        f"{kohya_key('unet', Q)}.dora_scale",
        f"{kohya_key('unet', V2)}.lora_up.weight",
        f"{kohya_key('unet', V2)}.lora_down.weight",
    }
    assert "no module" in patches.unmatched["lora_unet_no_such_block_to_q.lora_up.weight"]
    assert "does not fit" in patches.unmatched[f"{kohya_key('unet', V2)}.lora_up.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnmatchedLoraKeys)
        result = tiny_pipe.txt2img("a cat <lora:partial:1>", options={"lora": {"folder": str(folder)}}, **GEN)
    assert "Lora unmatched keys: \"partial: 5\"" in result.infotexts[0]


def test_a_file_that_matches_nothing_is_an_error(tiny_pipe, folder):
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(2, 8)}, str(folder / "sdxl.safetensors"))
    with pytest.raises(ModelLoadError, match="changes nothing"):
        apply_loras(tiny_pipe, ["sdxl"], folder=folder)


@pytest.fixture()
def outside_lora(tmp_path: Path) -> Path:
    up, down = lowrank(64, 64, 4, 41)
    path = tmp_path / "x.safetensors"
    save_file(kohya_group("unet", Q, up, down, 4.0), str(path))
    return path


@pytest.mark.parametrize("name", ["../x", "../../x", "sub/../../x", "..\\x"])
def test_names_cannot_leave_the_folder(tiny_pipe, folder, outside_lora, monkeypatch, name):
    reads = []
    monkeypatch.setattr("aipaint_plugins.lora.api.read_lora_file", lambda *a, **k: reads.append(a))
    before = snapshot(tiny_pipe)
    with pytest.raises(NameOutsideFolder):
        tiny_pipe.txt2img(f"a cat <lora:{name}:1>", options={"lora": {"folder": str(folder)}}, **GEN)
    assert reads == []
    assert_bit_identical(tiny_pipe, before)


def test_absolute_paths_and_escaping_symlinks_are_refused(tiny_pipe, folder, outside_lora, monkeypatch):
    reads = []
    monkeypatch.setattr("aipaint_plugins.lora.api.read_lora_file", lambda *a, **k: reads.append(a))
    with pytest.raises(NameOutsideFolder, match="absolute"):
        apply_loras(tiny_pipe, [str(outside_lora.with_suffix(""))], folder=folder)
    with pytest.raises(NameOutsideFolder, match="absolute"):
        apply_loras(tiny_pipe, [str(outside_lora)], folder=folder)
    (folder / "link.safetensors").symlink_to(outside_lora)
    with pytest.raises(NameOutsideFolder, match="link"):
        apply_loras(tiny_pipe, ["link"], folder=folder)
    (folder / "linked_dir").symlink_to(outside_lora.parent, target_is_directory=True)
    with pytest.raises(NameOutsideFolder, match="link"):
        apply_loras(tiny_pipe, ["linked_dir/x"], folder=folder)
    assert reads == []
    assert "link" not in ModelFolder(folder, "lora").names()  # listings skip escaping links too


def test_unknown_name_lists_what_exists_and_pickles_need_opt_in(tiny_pipe, folder, kohya_file):
    with pytest.raises(InvalidParameter, match="style"):
        apply_loras(tiny_pipe, ["nope"], folder=folder)
    up, down = lowrank(64, 64, 4, 51)
    torch.save(kohya_group("unet", Q, up, down, 4.0), folder / "old.pt")
    with pytest.raises(UnsafeFileError, match="allow_pickle"):
        apply_loras(tiny_pipe, ["old"], folder=folder)
    before = snapshot(tiny_pipe)
    with apply_loras(tiny_pipe, ["old"], folder=folder, allow_pickle=True):
        torch.testing.assert_close(weight(tiny_pipe, "unet", Q), before[f"unet.{Q}.weight"] + up @ down)
    assert_bit_identical(tiny_pipe, before)


def test_subfolders_resolve_by_path_or_unique_stem(folder, kohya_file):
    (folder / "styles").mkdir()
    (folder / "style.safetensors").rename(folder / "styles" / "ink.safetensors")
    library = ModelFolder(folder, "lora")
    assert library.resolve("styles/ink").path == folder / "styles" / "ink.safetensors"
    assert library.resolve("ink").path == folder / "styles" / "ink.safetensors"
    assert library.names() == ["styles/ink"]


@pytest.fixture()
def text_lora(folder: Path) -> Path:
    """A strong LoRA on the cross-attention value projection (it moves the image a lot)."""
    up, down = lowrank(64, 32, 4, 61)
    save_file(kohya_group("unet", V2, up * 3, down * 3, 4.0), str(folder / "strong.safetensors"))
    return folder


def test_prompt_tag_changes_the_image_and_weight_zero_does_not(tiny_pipe, text_lora):
    options = {"lora": {"folder": str(text_lora)}}
    plain = pixels(tiny_pipe.txt2img("a cat", options=options, **GEN))
    half = pixels(tiny_pipe.txt2img("a cat <lora:strong:0.5>", options=options, **GEN))
    zero = pixels(tiny_pipe.txt2img("a cat <lora:strong:0>", options=options, **GEN))
    assert np.abs(half - plain).mean() > 1.0
    assert np.array_equal(zero, plain)
    # The API unit is the same LoRA at the same weight as the tag.
    unit = pixels(tiny_pipe.txt2img("a cat", adapters=(AdapterUnit("lora", {"name": "strong", "weight": 0.5}),),
                                    options=options, **GEN))
    assert np.array_equal(unit, half)
    again = pixels(tiny_pipe.txt2img("a cat", options=options, **GEN))  # switched off without any reload
    assert np.array_equal(again, plain)


def test_text_encoder_weight_is_separate(tiny_pipe, folder):
    tup, tdown = lowrank(32, 32, 4, 71)
    save_file(kohya_group("text_encoder", TE_Q, tup * 2, tdown * 2, 4.0), str(folder / "te.safetensors"))
    options = {"lora": {"folder": str(folder)}}
    plain = pixels(tiny_pipe.txt2img("a cat", options=options, **GEN))
    # A1111 order: <lora:name:te:unet>. A text-encoder-only LoRA does nothing at te weight 0 …
    assert np.array_equal(pixels(tiny_pipe.txt2img("a cat <lora:te:0:1>", options=options, **GEN)), plain)
    # … and changes the conditioning (so the image) otherwise: the prompt is encoded after patching.
    assert np.abs(pixels(tiny_pipe.txt2img("a cat <lora:te:1:0>", options=options, **GEN)) - plain).mean() > 0.5


def test_weights_restored_after_generation_and_after_an_error_mid_generation(tiny_pipe, text_lora):
    before = snapshot(tiny_pipe)
    seen: list[bool] = []

    def progress(done: int, total: int) -> None:
        seen.append(torch.equal(weight(tiny_pipe, "unet", V2), before[f"unet.{V2}.weight"]))
        raise KeyboardInterrupt("stop at the first step")

    with pytest.raises(KeyboardInterrupt):
        tiny_pipe.txt2img("a cat <lora:strong:1>", options={"lora": {"folder": str(text_lora)}}, progress=progress, **GEN)
    assert seen == [False]  # patched while running …
    assert_bit_identical(tiny_pipe, before)  # … restored after the error
    tiny_pipe.txt2img("a cat <lora:strong:1>", options={"lora": {"folder": str(text_lora)}}, **GEN)
    assert_bit_identical(tiny_pipe, before)


def test_switching_loras_reads_each_file_once(tiny_pipe, text_lora, kohya_file, monkeypatch):
    import aipaint_plugins.lora.api as api

    calls: list[Path] = []
    real = api.read_lora_file
    monkeypatch.setattr(api, "read_lora_file", lambda path, **k: calls.append(Path(path).name) or real(path, **k))
    api._patch_cache.pop(tiny_pipe.model, None)
    options = {"lora": {"folder": str(text_lora)}}
    for prompt in ("a <lora:strong:1>", "a <lora:style:1>", "a <lora:strong:0.3>", "a <lora:style:1> <lora:strong:1>"):
        tiny_pipe.txt2img(prompt, options=options, **GEN)
    assert sorted(calls) == ["strong.safetensors", "style.safetensors"]


def addnet_hash(path: Path) -> str:
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header:]).hexdigest()[:12]


def test_infotext_records_lora_hashes_and_from_png_reproduces(tiny_pipe, tiny_sd_path, text_lora, kohya_file, tmp_path,
                                                              monkeypatch):
    from aipaint.cli.main import main

    options = {"lora": {"folder": str(text_lora)}}
    result = tiny_pipe.txt2img("a cat <lora:strong:0.8> <lora:style:0.4>", options=options, **GEN)
    info = Infotext.from_text(result.infotexts[0])
    strong, style = addnet_hash(text_lora / "strong.safetensors"), addnet_hash(text_lora / "style.safetensors")
    assert info.params["Lora hashes"] == f"strong: {strong}, style: {style}"
    assert "Lora units" not in info.params  # tags come back with the prompt; recording them twice would double them
    assert f'Lora hashes: "strong: {strong}, style: {style}"' in result.infotexts[0]
    png = tmp_path / "with-lora.png"
    result.save(png)
    monkeypatch.setenv("AIPAINT_LORA_DIR", str(text_lora))
    out = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(png), "-m", str(tiny_sd_path), "-o", str(out), "--no-progress"]) == 0
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(result.images[0]))
    assert "Lora hashes" in read_png_parameters(out)


def test_api_units_are_recorded_as_tags_and_from_png_reproduces_them(tiny_pipe, tiny_sd_path, text_lora, kohya_file,
                                                                     tmp_path, monkeypatch):
    from PIL import Image

    from aipaint.cli.main import main

    options = {"lora": {"folder": str(text_lora)}}
    units = (AdapterUnit("lora", {"name": "strong", "weight": 0.8}),
             AdapterUnit("lora", {"name": "style", "unet_weight": 0.4, "te_weight": -0.3}))
    result = tiny_pipe.txt2img("a cat <lora:style:0.25>", adapters=units, options=options, **GEN)
    info = Infotext.from_text(result.infotexts[0])
    assert info.prompt == "a cat <lora:style:0.25>"  # the prompt as the user wrote it
    assert info.params["Lora units"] == "<lora:strong:0.8> <lora:style:-0.3:0.4>"  # A1111 order: te, then unet
    plain = pixels(tiny_pipe.txt2img("a cat <lora:style:0.25>", options=options, **GEN))
    assert np.abs(pixels(result) - plain).mean() > 1.0  # so an image without the units cannot pass below
    png = tmp_path / "units.png"
    result.save(png)
    monkeypatch.setenv("AIPAINT_LORA_DIR", str(text_lora))
    out = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(png), "-m", str(tiny_sd_path), "-o", str(out), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(result.images[0]))
    assert Infotext.from_text(read_png_parameters(out)).params["Lora units"] == info.params["Lora units"]


def test_units_the_infotext_cannot_record_and_malformed_records_are_typed_errors(tiny_pipe, text_lora):
    from aipaint_plugins.lora import uses_from_recorded_units

    options = {"lora": {"folder": str(text_lora)}}
    for name in ("in:k", "a>b", " strong"):
        with pytest.raises(InvalidParameter, match="tag can spell"):
            tiny_pipe.txt2img("a", adapters=(AdapterUnit("lora", {"name": name}),), options=options, **GEN)
    assert [(u.name, u.unet_weight, u.te_weight) for u in uses_from_recorded_units("<lora:a:1> <lora:b:0.5:-2>")] == [
        ("a", 1.0, None), ("b", -2.0, 0.5)]
    for text in ("<lora:a:lots>", "<lora:a:1> and text", "<hypernet:a:1>"):
        with pytest.raises(InvalidParameter, match="Lora units"):
            uses_from_recorded_units(text)


def test_bad_units_are_typed_errors(tiny_pipe, text_lora):
    options = {"lora": {"folder": str(text_lora)}}
    with pytest.raises(InvalidParameter, match="options are"):
        tiny_pipe.txt2img("a", adapters=(AdapterUnit("lora", {"name": "strong", "strength": 1}),), options=options, **GEN)
    with pytest.raises(InvalidParameter, match="finite"):
        tiny_pipe.txt2img("a", adapters=(AdapterUnit("lora", {"name": "strong", "weight": "lots"}),), options=options, **GEN)


def test_lora_list_command(text_lora, kohya_file, monkeypatch, capsys):
    from aipaint.cli.main import main

    monkeypatch.setenv("AIPAINT_LORA_DIR", str(text_lora))
    assert main(["lora", "list", "--hashes"]) == 0
    out = capsys.readouterr().out
    assert "strong" in out and "style" in out and addnet_hash(text_lora / "style.safetensors") in out


def test_lyco_tags_are_lora_tags(tiny_pipe, text_lora):
    options = {"lora": {"folder": str(text_lora)}}
    lora = tiny_pipe.txt2img("a cat <lora:strong:0.5>", options=options, **GEN)
    lyco = tiny_pipe.txt2img("a cat <lyco:strong:0.5>", options=options, **GEN)
    assert np.array_equal(pixels(lyco), pixels(lora))
    assert Infotext.from_text(lyco.infotexts[0]).params["Lora hashes"] == Infotext.from_text(lora.infotexts[0]).params["Lora hashes"]


def test_a_refused_lora_name_is_explained_with_a_lora_tag(folder):
    from aipaint_plugins.lora.api import lora_folder

    with pytest.raises(NameOutsideFolder) as refused:
        lora_folder(folder).resolve("../x")
    assert "<lora:my_style:0.8>" in refused.value.hint and "lora file" in refused.value.hint


def test_a_lora_whose_card_names_another_family_warns_and_one_without_a_card_does_not(tiny_pipe, text_lora):
    """``aipaint get`` writes a card beside each file; a LoRA made for SDXL on an SD 1.5 model is
    worth a warning (its keys may even match, and then it spoils the image quietly)."""
    from aipaint.sources.cards import write_card

    options = {"lora": {"folder": str(text_lora)}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", AipaintWarning)  # no card: nothing to say
        tiny_pipe.txt2img("a cat <lora:strong:0.5>", options=options, **GEN)
    write_card(text_lora / "strong.safetensors", {"kind": "lora", "file": "strong.safetensors", "base_model": "SDXL 1.0"})
    with pytest.warns(AipaintWarning, match=r"LoRA strong was made for SDXL 1.0 \(sdxl\), but the loaded model is sd15"):
        tiny_pipe.txt2img("a cat <lora:strong:0.5>", options=options, **GEN)
    write_card(text_lora / "strong.safetensors", {"kind": "lora", "file": "strong.safetensors", "base_model": "SD 1.5"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", AipaintWarning)
        tiny_pipe.txt2img("a cat <lora:strong:0.5>", options=options, **GEN)
