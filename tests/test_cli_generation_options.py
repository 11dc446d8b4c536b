"""Generation commands: the folders plugins add (--lora-dir, --embeddings-dir), --allow-pickle reaching
them, and the model --from-png picks when no -m is given."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file

from aipaint.cli.api import build_request
from aipaint.cli.main import build_parser, main
from aipaint.infotext import Infotext, read_png_parameters
from aipaint.models import zoo

SMALL = ["--steps", "2", "-W", "32", "-H", "32", "--seed", "3", "--sampler", "Euler", "--no-progress"]
V2 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"  # Linear 32 -> 64 (reads the text)


def params_of(png: Path) -> dict[str, str]:
    return Infotext.from_text(read_png_parameters(png)).params


def strong_lora() -> dict[str, torch.Tensor]:
    from aipaint_plugins.lora.formats import kohya_key

    g = torch.Generator().manual_seed(61)
    base = kohya_key("unet", V2)
    return {f"{base}.lora_up.weight": torch.randn(64, 4, generator=g) * 1.5,
            f"{base}.lora_down.weight": torch.randn(4, 32, generator=g) * 1.5, f"{base}.alpha": torch.tensor(4.0)}


@pytest.fixture()
def folders(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A LoRA folder and an embeddings folder, each with a safetensors file and a pickle; the
    environment points at empty folders, so only the options can find them."""
    loras, embeddings = tmp_path / "loras", tmp_path / "embeddings"
    loras.mkdir()
    embeddings.mkdir()
    save_file(strong_lora(), str(loras / "strong.safetensors"))
    torch.save(strong_lora(), loras / "old.pt")
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(1)) * 2
    save_file({"emb_params": vectors}, str(embeddings / "MyStyle.safetensors"))
    torch.save({"string_to_param": {"*": vectors}}, embeddings / "oldstyle.pt")
    monkeypatch.setenv("AIPAINT_LORA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("AIPAINT_EMBEDDINGS_DIR", str(tmp_path / "empty"))
    return loras, embeddings


def test_lora_dir_and_embeddings_dir_options_reach_the_adapters(tiny_sd_path, folders, tmp_path):
    loras, embeddings = folders
    plain, with_lora, with_ti = tmp_path / "plain.png", tmp_path / "lora.png", tmp_path / "ti.png"
    assert main(["generate", "a mystyle cat", "-m", str(tiny_sd_path), *SMALL, "-o", str(plain)]) == 0
    assert main(["generate", "a mystyle cat <lora:strong:1>", "-m", str(tiny_sd_path), *SMALL, "--lora-dir", str(loras),
                 "-o", str(with_lora)]) == 0
    assert main(["generate", "a mystyle cat", "-m", str(tiny_sd_path), *SMALL, "--embeddings-dir", str(embeddings),
                 "-o", str(with_ti)]) == 0
    assert params_of(with_lora)["Lora hashes"].startswith("strong: ")
    assert params_of(with_ti)["TI hashes"].startswith("MyStyle: ")
    base = np.asarray(Image.open(plain), dtype=np.int16)
    assert np.abs(np.asarray(Image.open(with_lora), dtype=np.int16) - base).mean() > 1.0
    assert not np.array_equal(np.asarray(Image.open(with_ti), dtype=np.int16), base)


def test_allow_pickle_reaches_lora_and_embedding_loading(tiny_sd_path, folders, tmp_path, capsys):
    loras, embeddings = folders
    cases = [
        (["a cat <lora:old:1>", "--lora-dir", str(loras)], "Lora hashes", "old: "),
        (["a oldstyle cat", "--embeddings-dir", str(embeddings)], "TI hashes", "oldstyle: "),
    ]
    for index, (args, key, value) in enumerate(cases):
        out = tmp_path / f"pickle-{index}.png"
        capsys.readouterr()
        assert main(["generate", *args, "-m", str(tiny_sd_path), *SMALL, "-o", str(out)]) == 2
        assert "allow_pickle" in capsys.readouterr().err and not out.exists()
        assert main(["generate", *args, "-m", str(tiny_sd_path), *SMALL, "--allow-pickle", "-o", str(out)]) == 0
        assert params_of(out)[key].startswith(value)


@pytest.mark.parametrize("command", [["generate"], ["img2img", "in.png"], ["inpaint", "in.png", "mask.png"],
                                     ["outpaint", "in.png"]])
def test_every_generation_command_puts_the_folders_and_pickle_opt_in_into_the_request(command):
    args = build_parser().parse_args([*command, "x", "--lora-dir", "my/loras", "--embeddings-dir", "my/emb", "--allow-pickle"])
    request = build_request(args)
    assert {name: group.folder for name, group in request.options.items()} == {"lora": Path("my/loras"),
                                                                                "embeddings": Path("my/emb")}
    assert request.allow_pickle is True
    plain = build_request(build_parser().parse_args([*command, "x"]))
    assert plain.options == {} and plain.allow_pickle is False


def test_the_folder_options_come_from_the_plugins_not_the_core(monkeypatch, capsys):
    """First-party plugins add their options as a third-party plugin would: without them loaded, there are none."""
    monkeypatch.setenv("AIPAINT_LOAD_PLUGINS", "sd15,samplers")
    for option in ("--lora-dir", "--embeddings-dir"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["generate", "x", option, "d"])
        assert "unrecognized arguments" in capsys.readouterr().err


# --- --from-png picks the model the PNG names ------------------------------------------------------------
@pytest.fixture()
def zoo_cards(tmp_path, monkeypatch):
    """Write extra zoo cards (AIPAINT_ZOO_PATH) for one test."""
    folder = tmp_path / "cards"
    folder.mkdir()

    def write(**card):
        (folder / f"{card['id']}.json").write_text(json.dumps(card))
        zoo._cards.cache_clear()

    monkeypatch.setenv("AIPAINT_ZOO_PATH", str(folder))
    zoo._cards.cache_clear()
    yield write
    zoo._cards.cache_clear()


def write_png(path: Path, parameters: str) -> Path:
    info = PngInfo()
    info.add_text("parameters", parameters)
    Image.new("RGB", (32, 32), "white").save(path, pnginfo=info)
    return path


def test_from_png_loads_the_zoo_model_the_png_names(tiny_sd_path, zoo_cards, tmp_path, capsys):
    zoo_cards(id="tiny-test", family="sd15", source={"kind": "local", "path": str(tiny_sd_path)})
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    assert main(["generate", "a red circle", "-m", "tiny-test", *SMALL, "-o", str(first)]) == 0
    assert params_of(first)["Model"] == "tiny-test"
    capsys.readouterr()
    assert main(["generate", "--from-png", str(first), "--no-progress", "-o", str(again)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert params_of(again)["Model"] == "tiny-test" and again.read_bytes() == first.read_bytes()


def test_from_png_finds_a_zoo_model_by_its_hash(tiny_sd_path, zoo_cards, tmp_path, capsys):
    digest = "0123456789" + "ab" * 27
    zoo_cards(id="tiny-test", family="sd15", source={"kind": "local", "path": str(tiny_sd_path)},
              files=[{"name": "model.safetensors", "sha256": digest}])
    png = write_png(tmp_path / "hash.png", "a red circle\nSteps: 2, Sampler: Euler, Seed: 1, Size: 32x32, "
                                           f"Model hash: {digest[:10]}, Model: renamed-by-someone")
    out = tmp_path / "out.png"
    assert main(["generate", "--from-png", str(png), "--no-progress", "-o", str(out)]) == 0
    assert params_of(out)["Model"] == "tiny-test" and "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(("model", "says"), [
    ("tiny-sd", ["'tiny-sd'", "not in the zoo", "pass -m with that model"]),
    ("hub-only", ["'hub-only'", "not downloaded yet", "pass -m hub-only"]),
])
def test_from_png_keeps_the_default_and_warns_when_the_named_model_is_not_here(
        model, says, tiny_sd_path, zoo_cards, tmp_path, monkeypatch, capsys):
    import aipaint

    zoo_cards(id="hub-only", family="sd15", source={"kind": "hub", "repo": "nobody-here/no-such-model", "file": "m.safetensors"})
    png = write_png(tmp_path / "named.png", f"a red circle\nSteps: 2, Sampler: Euler, Seed: 1, Size: 32x32, Model: {model}")
    asked: list[object] = []
    real_load = aipaint.load

    def load(source=None, **kwargs):  # record the model asked for; paint with the tiny one
        asked.append(source)
        return real_load(tiny_sd_path, **kwargs)

    monkeypatch.setattr(aipaint, "load", load)
    assert main(["generate", "--from-png", str(png), "--no-progress", "-o", str(tmp_path / "out.png")]) == 0
    err = capsys.readouterr().err
    assert asked == [None]  # the default model
    warning = next(line for line in err.splitlines() if line.startswith("aipaint: warning:"))
    assert all(part in warning for part in says) and "default model 'shapes-tiny'" in warning
