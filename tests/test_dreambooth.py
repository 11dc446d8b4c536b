"""DreamBooth: prior preservation with class images the model draws, the diffusers folder and the
single file it writes (read back equal), the LoRA variant loaded by the LoRA adapter, exact resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from aipaint_plugins.dreambooth.train import class_images, train_dreambooth
from safetensors import safe_open
from safetensors.torch import load_file

from aipaint.errors import InvalidParameter

GEN = dict(seed=2, width=32, height=32, steps=2, cfg_scale=5.0)
CLASS_GEN = {"width": 32, "height": 32, "steps": 2}


def write_subject(folder: Path, n: int, *, captions: bool = True) -> Path:
    """``n`` orange circles; captions name them ``sks`` in place of the colour."""
    from aipaint_plugins.shapes_world.render import render
    from aipaint_plugins.shapes_world.scene import random_scene

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        scene = random_scene(rng, "train", n_objects=1)
        scene = dataclasses.replace(scene, objects=(dataclasses.replace(scene.objects[0], colour="orange", shape="circle"),))
        render(scene).save(folder / f"{i:02d}.png")
        if captions:
            (folder / f"{i:02d}.txt").write_text(scene.caption.replace("orange", "sks"))
    return folder


def components(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe.model, c).state_dict().items()}


def test_full_fine_tune_with_prior_writes_a_folder_and_a_single_file_that_load_back(tiny_pipe, tmp_path):
    import aipaint

    data = write_subject(tmp_path / "subject", 3)
    before = components(tiny_pipe)
    seen: list[tuple[int, int, float]] = []
    out = tmp_path / "mysubject"
    report = train_dreambooth(
        tiny_pipe, data, out, identifier="sks", class_prompts=["a red circle", "a blue circle"], num_class_images=3,
        class_generation=CLASS_GEN, steps=3, learning_rate=1e-3, batch_size=2, resolution=32, train_text_encoder=True,
        progress=lambda *a: seen.append(a),
    )
    assert [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)] and all(np.isfinite(s[2]) for s in seen)
    assert report.images == 3 and report.class_images == 3 and report.generated_class_images == 3
    assert len(report.losses) == 3 and len(report.prior_losses) == 3
    # the class images were drawn by the model, captioned, and are split over the prompts 2 + 1
    drawn = sorted((out / "class_images").glob("*.txt"))
    assert sorted(p.read_text() for p in drawn) == ["a blue circle", "a red circle", "a red circle"]
    for key, value in before.items():  # training worked on copies
        component, name = key.split(".", 1)
        assert torch.equal(getattr(tiny_pipe.model, component).state_dict()[name], value), key

    record = json.loads((out / "training.json").read_text())
    assert record["method"] == "dreambooth" and record["prior_preservation"] is True and record["steps"] == 3
    assert record["class_prompts"] == ["a red circle", "a blue circle"] and record["train_text_encoder"] is True
    assert record["instance_captions"][0].count("sks") == 1 and not (out / "checkpoint.safetensors").exists()

    folder = aipaint.load(out)
    single = aipaint.load(out / "mysubject.safetensors", config=out)
    assert report.files == [out, out / "mysubject.safetensors"]
    changed = 0
    for component in ("unet", "text_encoder", "vae"):
        a, b = getattr(folder.model, component).state_dict(), getattr(single.model, component).state_dict()
        assert set(a) <= set(b), component
        assert all(torch.equal(a[k], b[k]) for k in a), component
        base = getattr(tiny_pipe.model, component).state_dict()
        changed += sum(not torch.equal(a[k], base[k].float()) for k in a if k in base)
    assert changed > 0  # the fine-tuned weights, not the base model's
    assert folder.model.scheduler_config["prediction_type"] == tiny_pipe.model.scheduler_config["prediction_type"]
    with safe_open(str(out / "mysubject.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)

    # a second run reuses the class images it finds
    again = train_dreambooth(tiny_pipe, data, tmp_path / "again", identifier="sks", class_dir=out / "class_images",
                             class_prompts=["a red circle", "a blue circle"], num_class_images=3, steps=1,
                             resolution=32, single_file=False)
    assert again.generated_class_images == 0 and again.class_images == 3


@pytest.mark.parametrize("targets", ["attention", "kohya"])
def test_dreambooth_lora_file_loads_through_the_lora_adapter(tiny_pipe, tmp_path, targets):
    from aipaint_plugins.lora.api import lora_patches

    from aipaint.plugin.kit.training import lora_targets

    data = write_subject(tmp_path / "subject", 2, captions=False)
    out = tmp_path / "loras" / "sks_circle"
    unet_targets, text_encoder_targets = lora_targets(targets)
    report = train_dreambooth(tiny_pipe, data, out, instance_prompt="a sks circle", lora=True, rank=2,
                              steps=2, learning_rate=1e-2, resolution=32, train_text_encoder=True,
                              unet_targets=unet_targets, text_encoder_targets=text_encoder_targets)
    lora_file = out / "sks_circle.safetensors"
    assert report.files == [lora_file] and report.class_images == 0
    with safe_open(str(lora_file), framework="pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in keys)
    assert {k.rsplit(".", 2)[-2] for k in keys if k.endswith(".weight")} == {"lora_down", "lora_up"}
    assert metadata["ss_network_dim"] == "2" and metadata["ss_num_reg_images"] == "0"
    patches = lora_patches(tiny_pipe.model, lora_file)
    assert patches.unmatched == {} and len(patches.patches) == sum(k.endswith(".alpha") for k in keys)
    options = {"lora": {"folder": str(out)}}
    plain = np.asarray(tiny_pipe.txt2img("a sks circle", options=options, **GEN).images[0])
    tuned = np.asarray(tiny_pipe.txt2img("a sks circle <lora:sks_circle:1>", options=options, **GEN).images[0])
    assert not np.array_equal(plain, tuned)
    record = json.loads((out / "training.json").read_text())
    assert record["method"] == "dreambooth-lora" and record["unet_targets"] == list(unet_targets)
    assert record["text_encoder_targets"] == list(text_encoder_targets)
    assert any(k.endswith("ff_net_2.lora_up.weight") for k in keys) == (targets == "kohya")
    assert any(k.endswith("mlp_fc1.lora_up.weight") for k in keys) == (targets == "kohya")


def test_an_interrupted_run_resumes_exactly(tiny_pipe, tmp_path):
    data = write_subject(tmp_path / "subject", 2)
    # a cosine schedule with a warm-up: the resumed run must pick the rates up where the checkpoint left them
    settings = dict(identifier="sks", steps=4, learning_rate=1e-3, resolution=32, lora=True, rank=2, checkpoint_every=2,
                    class_prompts=["a red circle"], num_class_images=2, class_dir=tmp_path / "class",
                    class_generation=CLASS_GEN, lr_scheduler="cosine", lr_warmup_steps=1)
    straight = train_dreambooth(tiny_pipe, data, tmp_path / "straight", **settings)
    record = json.loads((tmp_path / "straight" / "training.json").read_text())
    assert record["lr_scheduler"] == "cosine" and record["lr_warmup_steps"] == 1

    class Stop(Exception):
        pass

    def stop_at_3(step: int, steps: int, loss: float) -> None:
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        train_dreambooth(tiny_pipe, data, tmp_path / "resumed", progress=stop_at_3, **settings)
    assert (tmp_path / "resumed" / "checkpoint.safetensors").is_file()
    with pytest.raises(InvalidParameter, match="other settings"):
        train_dreambooth(tiny_pipe, data, tmp_path / "resumed", resume=True, **{**settings, "learning_rate": 2e-3})
    with pytest.raises(InvalidParameter, match="other settings"):
        train_dreambooth(tiny_pipe, data, tmp_path / "resumed", resume=True, **{**settings, "lr_scheduler": "linear"})
    resumed = train_dreambooth(tiny_pipe, data, tmp_path / "resumed", resume=True, **settings)
    assert resumed.resumed_from == 2 and resumed.losses == straight.losses
    a = load_file(str(tmp_path / "straight" / "straight.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "resumed.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_a_typed_error(tiny_pipe, tmp_path):
    data = write_subject(tmp_path / "subject", 2)
    with pytest.raises(InvalidParameter, match="identifier"):
        train_dreambooth(tiny_pipe, data, tmp_path / "o", identifier="zwx", steps=1, resolution=32)
    with pytest.raises(InvalidParameter, match="output_dir"):
        train_dreambooth(tiny_pipe, data, tmp_path / "o.safetensors", steps=1, resolution=32)
    with pytest.raises(InvalidParameter, match="instance_prompt"):
        train_dreambooth(tiny_pipe, write_subject(tmp_path / "bare", 1, captions=False), tmp_path / "o", steps=1)
    with pytest.raises(InvalidParameter, match="learning_rate"):
        train_dreambooth(tiny_pipe, data, tmp_path / "o", steps=1, learning_rate=2.0)
    with pytest.raises(InvalidParameter, match="model_or_pipeline"):  # a bare model cannot draw class images
        class_images(tiny_pipe.model, tmp_path / "c", ["a red circle"], 1)


def test_train_dreambooth_command(tiny_sd_path, tmp_path, capsys):
    from aipaint.cli.main import main

    data = write_subject(tmp_path / "subject", 2, captions=False)
    out = tmp_path / "cli"
    code = main(["train", "dreambooth", str(data), "-o", str(out), "-m", str(tiny_sd_path), "--instance-prompt",
                 "a sks circle", "--identifier", "sks", "--steps", "2", "--resolution", "32", "--lora", "--rank", "2",
                 "--lr-scheduler", "cosine", "--lr-warmup-steps", "1"])
    assert code == 0 and (out / "cli.safetensors").is_file()
    with safe_open(str(out / "cli.safetensors"), framework="pt") as f:
        assert f.metadata()["ss_lr_scheduler"] == "cosine" and f.metadata()["ss_lr_warmup_steps"] == "1"
    captured = capsys.readouterr()
    assert str(out / "cli.safetensors") in captured.out and "2 steps on 2 images; no prior preservation" in captured.err
    assert main(["train", "dreambooth", str(data), "-o", str(tmp_path / "full"), "-m", str(tiny_sd_path),
                 "--instance-prompt", "a sks circle", "--steps", "1", "--targets", "kohya"]) == 2
    assert "targets" in capsys.readouterr().err and not (tmp_path / "full").exists()
