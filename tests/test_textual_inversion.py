"""Textual inversion: embedding formats, use by name, the reversible token patch, infotext."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from aipaint_plugins.textual_inversion.embeddings import Embedding, added_tokens, read_embedding
from safetensors.torch import save_file

from aipaint.api.request import GenerationRequest
from aipaint.errors import InvalidParameter, ModelLoadError, UnsafeFileError, UnsupportedFeature
from aipaint.infotext import Infotext

GEN = dict(seed=5, width=32, height=32, steps=2, cfg_scale=5.0)


def vectors(n: int, seed: int, hidden: int = 32) -> torch.Tensor:
    return torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "embeddings"
    root.mkdir()
    save_file({"emb_params": vectors(2, 1)}, str(root / "MyStyle.safetensors"))  # A1111, two vectors
    save_file({"<toy>": vectors(1, 2)[0]}, str(root / "toy.safetensors"))  # diffusers, one vector
    return root


def conditioning(pipe, prompt: str, folder: Path | None, negative: str = "") -> tuple[torch.Tensor, torch.Tensor, dict]:
    from engine_support import record_job

    options = {"embeddings": {"folder": str(folder) if folder is not None else "/nonexistent-embeddings"}}
    request = GenerationRequest(prompt=prompt, negative_prompt=negative, options=options, **{**GEN, "steps": 1})
    with record_job() as job:
        pipe.generate(request)
    step = job.conditioning_at(0)
    return step.positives[0][0].embeds.clone(), step.negative.embeds.clone(), job.infotext


def test_formats(folder, tmp_path):
    a1111 = read_embedding(folder / "MyStyle.safetensors", "MyStyle")
    assert a1111.vectors.shape == (2, 32) and torch.equal(a1111.vectors, vectors(2, 1))
    assert read_embedding(folder / "toy.safetensors", "toy").vectors.shape == (1, 32)
    pt = tmp_path / "old.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors(3, 3)}, "name": "old", "step": 10}, pt)
    with pytest.raises(UnsafeFileError):
        read_embedding(pt, "old")
    assert torch.equal(read_embedding(pt, "old", allow_pickle=True).vectors, vectors(3, 3))
    save_file({"clip_l": vectors(1, 4, 768), "clip_g": vectors(1, 4, 1280)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(ModelLoadError, match="SDXL"):
        read_embedding(tmp_path / "xl.safetensors", "xl")


def test_added_tokens_feed_the_vectors_and_restore_everything(tiny_pipe):
    model = tiny_pipe.model
    tokenizer, text_encoder = model.tokenizer, model.text_encoder
    table = text_encoder.get_input_embeddings()
    table_before = table.weight.detach().clone()
    length, ids_before = len(tokenizer), tokenizer(["a mystyle cat"])["input_ids"]
    embedding = Embedding("MyStyle", vectors(2, 1), Path("MyStyle.safetensors"))
    encoder = model.prompt_encoder()
    with added_tokens(tokenizer, text_encoder, [embedding]) as spellings:
        text = f"a {spellings['MyStyle']} cat"
        assert encoder.count_tokens(text) == [4]  # two vectors take two token places, as in A1111
        seen = {}
        handle = text_encoder.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.setdefault("rows", o))
        with torch.no_grad():
            encoder.encode(text)
        handle.remove()
        torch.testing.assert_close(seen["rows"][0, 2:4], embedding.vectors)
    assert text_encoder.get_input_embeddings() is table and torch.equal(table.weight, table_before)
    assert len(tokenizer) == length and tokenizer(["a mystyle cat"])["input_ids"] == ids_before


def test_conditioning_changes_only_when_the_name_is_used(tiny_pipe, folder):
    plain, _, info = conditioning(tiny_pipe, "a cat", None)
    same, _, info_unused = conditioning(tiny_pipe, "a cat", folder)
    assert torch.equal(plain, same) and "TI hashes" not in info_unused
    without, _, _ = conditioning(tiny_pipe, "a mystyle cat", None)
    with_ti, _, info = conditioning(tiny_pipe, "a MyStyle cat", folder)
    assert not torch.allclose(with_ti, without)
    digest = hashlib.sha256((folder / "MyStyle.safetensors").read_bytes()).hexdigest()[:12]
    assert info["TI hashes"] == f"MyStyle: {digest}"
    # A longer word that merely starts with the name is not the embedding.
    longer, _, info_longer = conditioning(tiny_pipe, "a mystyles cat", folder)
    assert "TI hashes" not in info_longer
    # And the tokenizer is back: the same prompt without embeddings encodes as before.
    assert torch.equal(conditioning(tiny_pipe, "a mystyle cat", None)[0], without)


def test_negative_prompt_and_emphasis(tiny_pipe, folder):
    _, negative_plain, _ = conditioning(tiny_pipe, "a cat", None, negative="toy")
    _, negative_ti, info = conditioning(tiny_pipe, "a cat", folder, negative="toy")
    assert not torch.allclose(negative_plain, negative_ti) and info["TI hashes"].startswith("toy: ")
    normal, _, _ = conditioning(tiny_pipe, "a toy cat", folder)
    stressed, _, _ = conditioning(tiny_pipe, "a (toy:1.5) cat", folder)
    assert not torch.allclose(normal, stressed)


def test_generation_uses_embeddings_and_records_them(tiny_pipe, folder):
    options = {"embeddings": {"folder": str(folder)}}
    plain = np.asarray(tiny_pipe.txt2img("a mystyle cat", options={"embeddings": {"folder": "/nonexistent"}}, **GEN).images[0])
    result = tiny_pipe.txt2img("a mystyle cat", options=options, **GEN)
    assert not np.array_equal(np.asarray(result.images[0]), plain)
    assert "TI hashes" in Infotext.from_text(result.infotexts[0]).params
    assert "a mystyle cat" in result.infotexts[0]  # the prompt is recorded as written


def test_wrong_size_is_a_clear_error(tiny_pipe, tmp_path):
    root = tmp_path / "emb"
    root.mkdir()
    save_file({"emb_params": vectors(1, 9, hidden=768)}, str(root / "big.safetensors"))
    with pytest.raises(InvalidParameter, match="768"):
        tiny_pipe.txt2img("a big cat", options={"embeddings": {"folder": str(root)}}, **GEN)
    assert len(tiny_pipe.model.tokenizer) == 49408


@pytest.mark.parametrize("layout", ["two encoders", "no first encoder"])
def test_models_without_exactly_one_text_encoder_refuse_embeddings(tiny_pipe, folder, monkeypatch, layout):
    """SDXL (and its refiner): the tokens would reach only one encoder, so the prompt would be misread."""
    if layout == "two encoders":
        monkeypatch.setattr(tiny_pipe.model, "text_encoder_2", tiny_pipe.model.text_encoder, raising=False)
    else:
        monkeypatch.setattr(tiny_pipe.model, "text_encoder", None)
    with pytest.raises(UnsupportedFeature, match="MyStyle.*one text encoder"):
        tiny_pipe.txt2img("a mystyle cat", options={"embeddings": {"folder": str(folder)}}, **GEN)


def test_embeddings_command(folder, monkeypatch, capsys):
    from aipaint.cli.main import main

    monkeypatch.setenv("AIPAINT_EMBEDDINGS_DIR", str(folder))
    assert main(["embeddings"]) == 0
    out = capsys.readouterr().out
    assert "MyStyle" in out and "toy" in out


def test_a_refused_embedding_name_is_explained_as_an_embedding_not_a_lora(folder, tmp_path):
    from aipaint_plugins.textual_inversion import embeddings_folder

    from aipaint.plugin.kit.folders import NameOutsideFolder

    (folder / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    save_file({"emb_params": vectors(1, 7)}, str(tmp_path / "outside.safetensors"))
    for name in ("../outside", "/etc/passwd", "link"):
        with pytest.raises(NameOutsideFolder) as refused:
            embeddings_folder(folder).resolve(name)
        hint = refused.value.hint
        assert "<lora" not in hint and "embedding file" in hint and "EasyNegative" in hint and hint in str(refused.value)
