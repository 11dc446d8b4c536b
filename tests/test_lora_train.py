"""LoRA training: data folder → kohya-format file that loads back; the held-out concept on the embedded model."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from aipaint_plugins.lora.api import apply_loras, lora_patches
from aipaint_plugins.lora.train import train_lora
from safetensors import safe_open

from aipaint.errors import InvalidParameter
from aipaint.plugin.kit.training import (
    check_lr_schedule,
    learning_rate_schedule,
    loss_target,
    noise_scheduler,
)

GEN = dict(seed=2, width=32, height=32, steps=2, cfg_scale=5.0)
EMBEDDED = Path(__file__).resolve().parents[1] / "zoo" / "models" / "shapes-tiny"


def write_dataset(folder: Path, n: int, *, colour: str | None = None, seed: int = 0) -> Path:
    """Shapes-world renders with their canonical captions (``colour`` forces the first object's colour)."""
    import dataclasses

    from aipaint_plugins.shapes_world.render import render
    from aipaint_plugins.shapes_world.scene import random_scene

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        scene = random_scene(rng, "heldout_colour" if colour == "orange" else "train", n_objects=1)
        if colour is not None:
            scene = dataclasses.replace(scene, objects=(dataclasses.replace(scene.objects[0], colour=colour),))
        render(scene).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(scene.caption)
    return folder


def snapshot(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe.model, c).state_dict().items()}


def test_trained_file_has_kohya_keys_loads_back_and_leaves_the_model_alone(tiny_pipe, tmp_path):
    data = write_dataset(tmp_path / "data", 4)
    before = snapshot(tiny_pipe)
    progress: list[tuple[int, int, float]] = []
    out = tmp_path / "loras" / "mine.safetensors"
    report = train_lora(tiny_pipe, data, out, rank=2, alpha=1, steps=3, learning_rate=1e-2, batch_size=2,
                        resolution=32, train_text_encoder=True, progress=lambda *a: progress.append(a))
    assert [p[:2] for p in progress] == [(1, 3), (2, 3), (3, 3)] and all(np.isfinite(p[2]) for p in progress)
    assert report.steps == 3 and report.images == 4 and len(report.losses) == 3
    for key, value in before.items():  # training worked on copies
        component, name = key.split(".", 1)
        assert torch.equal(getattr(tiny_pipe.model, component).state_dict()[name], value), key

    with safe_open(str(out), framework="pt") as f:
        keys = list(f.keys())
        metadata = f.metadata()
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    bases = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    unet_targets = [n for n, _ in tiny_pipe.model.unet.named_modules() if n.endswith(("attn1.to_q", "attn2.to_k", "to_v", "to_out.0"))]
    assert len(unet_targets) > 0
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in keys)
    assert {k.rsplit(".", 2)[-2] for k in keys if k.endswith(".weight")} == {"lora_down", "lora_up"}
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k" in bases
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in bases
    assert alphas == {1.0} and metadata["ss_network_dim"] == "2" and metadata["ss_network_alpha"] == "1"
    assert report.modules == len(bases)

    patches = lora_patches(tiny_pipe.model, out)
    assert patches.unmatched == {} and len(patches.patches) == report.modules
    options = {"lora": {"folder": str(out.parent)}}
    plain = np.asarray(tiny_pipe.txt2img("a red circle", options=options, **GEN).images[0])
    with_lora = np.asarray(tiny_pipe.txt2img("a red circle <lora:mine:1>", options=options, **GEN).images[0])
    assert not np.array_equal(plain, with_lora)
    with apply_loras(tiny_pipe, ["mine"], folder=out.parent):
        pass
    assert all(torch.equal(v, snapshot(tiny_pipe)[k]) for k, v in before.items())


def test_the_loss_follows_the_models_prediction_type():
    config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
              "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "_class_name": "DPMSolverMultistepScheduler"}
    model = type("M", (), {"scheduler_config": config})()
    scheduler = noise_scheduler(model)
    assert float(scheduler.alphas_cumprod[-1]) < 1e-6  # zero terminal SNR kept
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 999])
    a = scheduler.alphas_cumprod[t].sqrt().reshape(-1, 1, 1, 1)
    s = (1 - scheduler.alphas_cumprod[t]).sqrt().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(loss_target(scheduler, x0, noise, t), a * noise - s * x0)
    model.scheduler_config = {**config, "prediction_type": "epsilon"}
    assert torch.equal(loss_target(noise_scheduler(model), x0, noise, t), noise)


def rates(name: str, *, warmup: int, total: int, start: int = 0, peaks=(1e-3, 2e-3)) -> list[list[float]]:
    """Each step's learning rate per parameter group, stepping a schedule from ``start`` to the end."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in peaks]
    optimizer = torch.optim.AdamW([{"params": [p], "lr": lr} for p, lr in zip(params, peaks)])
    schedule = learning_rate_schedule(optimizer, name, warmup_steps=warmup, total_steps=total, start_step=start)
    seen = []
    for _ in range(start, total):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        schedule.step()
    return seen


def test_the_learning_rate_schedule_warms_up_decays_per_group_and_resumes_in_place():
    cosine = rates("cosine", warmup=2, total=10)
    assert [round(r[0] / 1e-3, 4) for r in cosine[:3]] == [0.0, 0.5, 1.0]  # linear warm-up, then the peak
    # half-way through the decay (step 6 of the 8 after warm-up) the cosine is at half the peak, in each group
    assert cosine[6] == pytest.approx([0.5e-3, 1e-3])
    assert all(a[0] > b[0] for a, b in zip(cosine[2:], cosine[3:]))  # falls every step after the warm-up
    assert rates("cosine", warmup=2, total=10, start=4) == cosine[4:]  # a resumed run follows the same rates
    assert rates("constant", warmup=0, total=3) == [[1e-3, 2e-3]] * 3
    # "constant" with a warm-up keeps the warm-up (diffusers' own "constant" would silently drop it)
    assert check_lr_schedule("constant", 2, 5) == "constant_with_warmup"
    assert [r[0] for r in rates("constant", warmup=2, total=4)] == pytest.approx([0.0, 0.5e-3, 1e-3, 1e-3])
    with pytest.raises(InvalidParameter, match="lr_scheduler"):
        check_lr_schedule("cosine_annealing", 0, 5)
    with pytest.raises(InvalidParameter, match="lr_warmup_steps"):
        check_lr_schedule("cosine", 5, 5)
    with pytest.raises(InvalidParameter, match="lr_warmup_steps"):
        check_lr_schedule("cosine", -1, 5)


def test_lora_training_follows_its_schedule_and_records_it(tiny_pipe, tmp_path):
    data = write_dataset(tmp_path / "data", 2)
    common = dict(rank=2, steps=3, learning_rate=1e-2, batch_size=1, resolution=32)
    constant = train_lora(tiny_pipe, data, tmp_path / "c.safetensors", **common)
    warmed = train_lora(tiny_pipe, data, tmp_path / "w.safetensors", lr_scheduler="linear", lr_warmup_steps=1, **common)
    # the first step runs at rate 0 during the warm-up, so it changes nothing: the same first loss, then the
    # runs part (the second step's weights differ)
    assert warmed.losses[0] == constant.losses[0] and warmed.losses[1] != constant.losses[1]
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_lr_scheduler"] == "linear" and meta["ss_lr_warmup_steps"] == "1"
    with pytest.raises(InvalidParameter, match="lr_warmup_steps"):
        train_lora(tiny_pipe, data, tmp_path / "x.safetensors", lr_warmup_steps=3, **common)
    assert not (tmp_path / "x.safetensors").exists()


def test_kohya_targets_adapt_feed_forward_projection_and_mlp_layers_and_load_back(tiny_sd_path, tiny_pipe, tmp_path):
    from aipaint.cli.main import main

    data = write_dataset(tmp_path / "data", 2)
    out = tmp_path / "loras" / "wide.safetensors"
    assert main(["train", "lora", str(data), "-o", str(out), "-m", str(tiny_sd_path), "--steps", "2", "--rank", "2",
                 "--batch-size", "1", "--resolution", "32", "--train-text-encoder", "--targets", "kohya"]) == 0
    with safe_open(str(out), framework="pt") as f:
        keys = list(f.keys())
        proj_in = next(f.get_tensor(k) for k in keys if k.endswith("proj_in.lora_down.weight"))
    bases = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    for layer in ("attn1_to_q", "ff_net_0_proj", "ff_net_2", "proj_in", "proj_out", "self_attn_q_proj", "mlp_fc1",
                  "mlp_fc2"):
        assert any(base.endswith(layer) for base in bases), layer
    assert proj_in.dim() == 4  # a 1x1 convolution's LoRA, as kohya writes it
    patches = lora_patches(tiny_pipe.model, out)  # every layer found again by the LoRA adapter
    assert patches.unmatched == {} and len(patches.patches) == len(bases)
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["train", "lora", str(data), "-o", str(tmp_path / "x.safetensors"), "--targets", "everything"])


def test_bad_training_input_is_a_typed_error(tiny_pipe, tmp_path):
    data = write_dataset(tmp_path / "data", 2)
    (data / "0001.txt").unlink()
    with pytest.raises(InvalidParameter, match="without a caption"):
        train_lora(tiny_pipe, data, tmp_path / "x.safetensors", steps=1, resolution=32)
    with pytest.raises(InvalidParameter, match="no images"):
        train_lora(tiny_pipe, tmp_path, tmp_path / "x.safetensors", steps=1, resolution=32)
    with pytest.raises(InvalidParameter, match="safetensors"):
        train_lora(tiny_pipe, data, tmp_path / "x.pt", steps=1, resolution=32)


def test_train_lora_command(tiny_sd_path, tmp_path, capsys):
    from aipaint.cli.main import main

    data = write_dataset(tmp_path / "data", 2)
    out = tmp_path / "cli.safetensors"
    code = main(["train", "lora", str(data), "-o", str(out), "-m", str(tiny_sd_path), "--steps", "2", "--rank", "2",
                 "--batch-size", "1", "--resolution", "32"])
    assert code == 0 and out.is_file()
    captured = capsys.readouterr()
    assert "2 steps on 2 images" in captured.err and "loss" in captured.err


def test_train_lora_command_takes_unset_settings_from_the_model_card(monkeypatch, tmp_path, capsys):
    """The embedded model's card carries its LoRA recipe; what the command line says wins, and a
    model without the card section gets the command's own defaults."""
    import json

    import aipaint_plugins.lora.train as train_module

    from aipaint.cli.main import main

    seen: list[dict] = []

    def fake_train(pipe, data_dir, output, **kwargs):
        seen.append(kwargs)
        Path(output).write_bytes(b"")
        return train_module.TrainReport(Path(output), kwargs["steps"], 1, 0.0, kwargs["rank"], 1.0, 1, [0.5])

    monkeypatch.setattr(train_module, "train_lora", fake_train)
    card = json.loads((Path(__file__).resolve().parent.parent / "zoo" / "cards" / "shapes-tiny.json").read_text())
    recipe = card["lora_training"]
    data = tmp_path / "d"
    data.mkdir()
    if (EMBEDDED / "unet").is_dir():
        assert main(["train", "lora", str(data), "-o", str(tmp_path / "a.safetensors")]) == 0
        assert {k: seen[-1][k] for k in ("steps", "learning_rate", "batch_size", "train_text_encoder")} == {
            k: recipe[k] for k in ("steps", "learning_rate", "batch_size", "train_text_encoder")}
        assert "from the model card: steps 300" in capsys.readouterr().err
        assert main(["train", "lora", str(data), "-o", str(tmp_path / "b.safetensors"), "--steps", "7",
                     "--no-train-text-encoder", "--lr-scheduler", "cosine", "--lr-warmup-steps", "2"]) == 0
        assert seen[-1]["steps"] == 7 and seen[-1]["train_text_encoder"] is False
        assert seen[-1]["lr_scheduler"] == "cosine" and seen[-1]["lr_warmup_steps"] == 2
        assert seen[-1]["learning_rate"] == recipe["learning_rate"]

    from aipaint_plugins.lora.commands import TRAINING_DEFAULTS, training_settings

    args = argparse.Namespace(steps=None, learning_rate=None, batch_size=None, train_text_encoder=None,
                              lr_scheduler=None, lr_warmup_steps=None)
    assert training_settings(args, {}) == (TRAINING_DEFAULTS, [])
    assert training_settings(args, None) == (TRAINING_DEFAULTS, [])
    # a caller with only some of the options (the benchmarks) leaves the rest to the card or the defaults
    some = argparse.Namespace(steps=9, learning_rate=None)
    settings, from_card = training_settings(some, {"lora_training": {"batch_size": 16, "learning_rate": 0.003}})
    assert settings == {**TRAINING_DEFAULTS, "steps": 9, "batch_size": 16, "learning_rate": 0.003}
    assert from_card == ["learning_rate", "batch_size"]


# --- behaviour on the embedded model: the held-out colour ------------------------------------------

ORANGE_PROMPTS = [
    "a big orange circle in the center, on a white background",
    "a big orange square on the left, on a gray background",
    "a big orange triangle at the top, on a black background",
    "a big orange cross on the right, on a white background",
]


def orange_adherence(pipe, prompt_suffix: str, *, images_per_prompt: int, lora_dir: Path, steps: int | None = None) -> float:
    """Fraction of generated images whose requested orange object reads as orange (``steps``: the model's default)."""
    from aipaint_plugins.shapes_world.evaluate import adherence

    hits = total = 0
    for i, prompt in enumerate(ORANGE_PROMPTS):
        result = pipe.txt2img(prompt + prompt_suffix, seed=100 + i * images_per_prompt, batch_size=images_per_prompt,
                              steps=steps, options={"lora": {"folder": str(lora_dir)}})
        for image in result.images:
            objects = adherence(image, prompt).details["objects"]
            hits += bool(objects and objects[0]["colour"])
            total += 1
    return hits / total


@pytest.mark.skipif(not (EMBEDDED / "unet").is_dir(), reason="the embedded model zoo/models/shapes-tiny is not built yet")
def test_short_training_teaches_the_held_out_colour(tmp_path):
    import aipaint

    torch.set_num_threads(1)
    pipe = aipaint.load()
    data = write_dataset(tmp_path / "orange", 48, colour="orange", seed=1)
    started = time.perf_counter()
    train_lora(pipe, data, tmp_path / "loras" / "orange.safetensors", rank=4, steps=int(os.environ.get("AIPAINT_TEST_LORA_STEPS", 150)),
               learning_rate=3e-3, batch_size=16, seed=0, train_text_encoder=True)
    trained_in = time.perf_counter() - started
    without = orange_adherence(pipe, "", images_per_prompt=4, lora_dir=tmp_path / "loras")
    with_lora = orange_adherence(pipe, " <lora:orange:1>", images_per_prompt=4, lora_dir=tmp_path / "loras")
    print(f"trained in {trained_in:.0f} s; orange adherence {without:.2f} -> {with_lora:.2f}")
    # Measured here (one thread, the model's defaults): 0.00 -> 0.88 at 150 steps with the text encoder (0.88 at 200
    # too); UNet only, 60 steps: 0.00 -> 0.19. The first-generation model (before the 2026-12-05
    # swap) learnt it UNet-only in 60 steps (0.38 -> 0.94): its base rate was not near 0, since for the colour word it
    # never learnt it often painted a red-yellow mix that read as orange; the current model paints no orange unasked.
    assert with_lora >= 0.75
    assert with_lora >= without + 0.3
