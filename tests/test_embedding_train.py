"""Textual inversion training: an A1111-layout embedding (emb_params) that the embeddings adapter uses
by name, learned without touching the model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from aipaint_plugins.textual_inversion.embeddings import read_embedding
from aipaint_plugins.textual_inversion.train import initial_vectors, train_embedding
from safetensors import safe_open

from aipaint.errors import InvalidParameter

GEN = dict(seed=2, width=32, height=32, steps=2, cfg_scale=5.0)


def write_subject(folder: Path, n: int, word: str = "sks", *, captions: bool = True) -> Path:
    from aipaint_plugins.shapes_world.render import render
    from aipaint_plugins.shapes_world.scene import random_scene

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        scene = random_scene(rng, "train", n_objects=1)
        scene = dataclasses.replace(scene, objects=(dataclasses.replace(scene.objects[0], colour="orange"),))
        render(scene).save(folder / f"{i:02d}.png")
        if captions:
            (folder / f"{i:02d}.txt").write_text(scene.caption.replace("orange", word))
    return folder


def test_trained_embedding_is_an_a1111_file_the_adapter_uses_and_the_model_is_untouched(tiny_pipe, tmp_path):
    data = write_subject(tmp_path / "data", 3)
    before = {k: v.clone() for k, v in tiny_pipe.model.text_encoder.state_dict().items()}
    tokens_before = len(tiny_pipe.model.tokenizer)
    flags = [p.requires_grad for p in tiny_pipe.model.unet.parameters()]
    seen: list[tuple[int, int, float]] = []
    out = tmp_path / "embeddings" / "sks.safetensors"
    report = train_embedding(tiny_pipe, data, out, vectors=2, init_text="circle", steps=3, learning_rate=0.05,
                             batch_size=2, resolution=32, progress=lambda *a: seen.append(a))
    assert [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)] and all(np.isfinite(s[2]) for s in seen)
    assert report.name == "sks" and report.vectors == 2 and report.images == 3

    with safe_open(str(out), framework="pt") as f:
        assert list(f.keys()) == ["emb_params"]
        vectors = f.get_tensor("emb_params")
        metadata = f.metadata()
    hidden = tiny_pipe.model.text_encoder.get_input_embeddings().weight.shape[1]
    assert vectors.shape == (2, hidden) and metadata["name"] == "sks" and metadata["step"] == "3"
    start = initial_vectors(tiny_pipe.model.tokenizer, before[next(k for k in before if "token_embedding" in k)],
                            "circle", 2)
    assert not torch.allclose(vectors, start)  # the vectors moved from their start
    assert torch.equal(read_embedding(out, "sks").vectors, vectors)  # the plugin's reader takes it as it is

    # nothing of the model changed: weights, vocabulary, UNet flags
    after = tiny_pipe.model.text_encoder.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())
    assert len(tiny_pipe.model.tokenizer) == tokens_before
    assert [p.requires_grad for p in tiny_pipe.model.unet.parameters()] == flags

    options = {"embeddings": {"folder": str(out.parent)}}
    with_embedding = tiny_pipe.txt2img("a sks circle", options=options, **GEN)
    plain = tiny_pipe.txt2img("a sks circle", **GEN)
    assert "TI hashes" in with_embedding.infotexts[0] and "TI hashes" not in plain.infotexts[0]
    assert not np.array_equal(np.asarray(with_embedding.images[0]), np.asarray(plain.images[0]))


def test_training_is_deterministic_and_init_text_sets_the_start(tiny_pipe, tmp_path):
    data = write_subject(tmp_path / "data", 2)
    a = train_embedding(tiny_pipe, data, tmp_path / "a" / "sks.safetensors", steps=2, resolution=32, batch_size=1)
    b = train_embedding(tiny_pipe, data, tmp_path / "b" / "sks.safetensors", steps=2, resolution=32, batch_size=1)
    assert a.losses == b.losses
    table = tiny_pipe.model.text_encoder.get_input_embeddings().weight.detach()
    tokenizer = tiny_pipe.model.tokenizer
    circle = tokenizer("circle", add_special_tokens=False)["input_ids"]
    assert torch.equal(initial_vectors(tokenizer, table, "circle", 3), table[[circle[0]] * 3])
    assert torch.count_nonzero(initial_vectors(tokenizer, table, "", 1)) == 0


def test_bad_input_is_a_typed_error(tiny_pipe, tmp_path):
    data = write_subject(tmp_path / "data", 2)
    with pytest.raises(InvalidParameter, match="name"):  # the captions say sks, the file would be called other
        train_embedding(tiny_pipe, data, tmp_path / "other.safetensors", steps=1, resolution=32)
    with pytest.raises(InvalidParameter, match="out_file"):
        train_embedding(tiny_pipe, data, tmp_path / "sks.pt", steps=1, resolution=32)
    with pytest.raises(InvalidParameter, match="caption"):
        train_embedding(tiny_pipe, write_subject(tmp_path / "bare", 1, captions=False), tmp_path / "sks.safetensors")
    with pytest.raises(InvalidParameter, match="vectors"):
        train_embedding(tiny_pipe, data, tmp_path / "sks.safetensors", vectors=0)
    with pytest.raises(InvalidParameter, match="lr_scheduler"):
        train_embedding(tiny_pipe, data, tmp_path / "sks.safetensors", steps=2, lr_scheduler="exponential")
    assert not (tmp_path / "sks.safetensors").exists()


def test_train_embedding_command(tiny_sd_path, tmp_path, capsys):
    from aipaint.cli.main import main

    data = write_subject(tmp_path / "data", 2, captions=False)
    out = tmp_path / "emb" / "zwx.safetensors"
    code = main(["train", "embedding", str(data), "-o", str(out), "-m", str(tiny_sd_path), "--caption",
                 "a zwx circle", "--steps", "2", "--batch-size", "1", "--resolution", "32", "--init-text", "circle",
                 "--lr-scheduler", "linear", "--lr-warmup-steps", "1"])
    assert code == 0 and out.is_file()
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["lr_scheduler"] == "linear" and f.metadata()["lr_warmup_steps"] == "1"
    captured = capsys.readouterr()
    assert str(out) in captured.out and "zwx: 1 vector(s), 2 steps on 2 images" in captured.err
