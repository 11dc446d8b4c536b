"""A few-step LoRA's own settings (sampler, schedule, steps, CFG) fill what a request leaves unset:
from a sidecar ``<name>.json`` beside the file, else from the zoo's LoRA cards; what the request
sets always wins; a card of another family does not apply."""

from __future__ import annotations

import json

import pytest
from aipaint_plugins.lora.defaults import card_for, lora_cards
from safetensors.torch import save_file
from test_lora import V2, kohya_group, lowrank

from aipaint.errors import InvalidParameter
from aipaint.infotext import Infotext
from aipaint.plugin.adapters import AdapterUnit

GEN = dict(seed=3, width=32, height=32)


def lora_file(folder, name: str) -> None:
    up, down = lowrank(64, 32, 4, 61)
    save_file(kohya_group("unet", V2, up, down, 4.0), str(folder / f"{name}.safetensors"))


def params(result) -> dict:
    return Infotext.from_text(result.infotexts[0]).params


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "loras"
    root.mkdir()
    lora_file(root, "lcm-lora-sdv1-5")  # a zoo card's name (its publisher's file, renamed as people do)
    lora_file(root, "lcm_lora_sdxl")  # an alias of the SDXL card
    lora_file(root, "mine")
    return root


def test_a_carded_lora_brings_its_sampler_steps_and_cfg_unless_the_request_sets_them(tiny_pipe, folder):
    options = {"lora": {"folder": str(folder)}}
    card = params(tiny_pipe.txt2img("a cat <lora:lcm-lora-sdv1-5:1>", options=options, **GEN))
    assert (card["Sampler"], card["Steps"], card["CFG scale"]) == ("LCM", "4", "1")
    unit = params(tiny_pipe.txt2img("a cat", adapters=(AdapterUnit("lora", {"name": "lcm-lora-sdv1-5"}),),
                                    options=options, **GEN))
    assert (unit["Sampler"], unit["Steps"]) == ("LCM", "4")
    mine = params(tiny_pipe.txt2img("a cat <lora:lcm-lora-sdv1-5:1>", options=options, steps=2, cfg_scale=2.5, **GEN))
    assert (mine["Sampler"], mine["Steps"], mine["CFG scale"]) == ("LCM", "2", "2.5")
    plain = params(tiny_pipe.txt2img("a cat <lora:mine:1>", options=options, **GEN))
    model = tiny_pipe.model.defaults
    assert (plain["Sampler"], plain["Steps"]) == (model.sampler, str(model.steps))
    other_family = params(tiny_pipe.txt2img("a cat <lora:lcm_lora_sdxl:1>", options=options, **GEN))
    assert other_family["Sampler"] == model.sampler  # the SDXL card is not for this SD 1.5 model


def test_a_sidecar_file_comes_first_and_bad_keys_are_refused(tiny_pipe, folder):
    options = {"lora": {"folder": str(folder)}}
    (folder / "lcm-lora-sdv1-5.json").write_text(json.dumps({"preferred weight": 1, "defaults": {"steps": 3}}))
    (folder / "mine.json").write_text(json.dumps({"activation text": "ink", "defaults": {"sampler": "TCD", "steps": 5}}))
    first = params(tiny_pipe.txt2img("a cat <lora:lcm-lora-sdv1-5:1>", options=options, **GEN))
    assert first["Steps"] == "3" and first["Sampler"] == tiny_pipe.model.defaults.sampler
    both = params(tiny_pipe.txt2img("a cat <lora:mine:1> <lora:lcm-lora-sdv1-5:1>", options=options, **GEN))
    assert (both["Sampler"], both["Steps"]) == ("TCD", "5")  # the first LoRA to ask for a setting wins
    (folder / "mine.json").write_text(json.dumps({"defaults": {"seed": 5}}))
    with pytest.raises(InvalidParameter, match="seed"):
        tiny_pipe.txt2img("a cat <lora:mine:1>", options=options, **GEN)


def test_every_lora_card_names_a_known_family_sampler_and_schedule(plugin_host):
    cards = lora_cards()
    assert len(cards) >= 8
    families = set(plugin_host.registry.families.names())
    for card in cards:
        assert card["family"] in families and card["source"]["repo"] and card["defaults"]
        sampler = plugin_host.registry.samplers.get(card["defaults"]["sampler"])
        sampler.check_schedule(card["defaults"].get("schedule", "Automatic"))
    assert card_for("LCM_LoRA_Weights_SD15.safetensors", "sd15", cards)["name"] == "lcm-lora-sdv1-5"
    assert card_for("LCM_LoRA_Weights_SD15", "sdxl", cards) is None
