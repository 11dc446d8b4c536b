"""The plugin kit: what plugins share so that none imports another."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import pkgutil
import re
from pathlib import Path

import pytest
import torch

import aipaint.plugin.kit as kit
from aipaint.errors import InvalidParameter
from aipaint.plugin.kit import hashing
from aipaint.plugin.kit.codecs import INDEX, Field, FieldsCodec, MappingCodec, TextCodec
from aipaint.plugin.kit.folders import ModelFolder, NameOutsideFolder, model_entries
from aipaint.plugin.kit.options import option_bool
from aipaint.plugin.kit.patches import AttributePatches, PatchSet

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- boundaries
def test_no_plugin_imports_another():
    crossing = []
    for path in sorted((ROOT / "plugins").rglob("*.py")):
        plugin = path.relative_to(ROOT / "plugins").parts[0]
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for other in re.findall(r"aipaint_plugins\.(\w+)", line):
                if other != plugin:
                    crossing.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert crossing == []


def kit_public_names() -> dict[str, list[str]]:
    """Each kit module's public top-level names, read from its source."""
    names: dict[str, list[str]] = {}
    for info in pkgutil.iter_modules(kit.__path__):
        tree = ast.parse((Path(kit.__path__[0]) / f"{info.name}.py").read_text())
        found = []
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                found.append(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                found += [t.id for t in targets if isinstance(t, ast.Name)]
        names[info.name] = [n for n in found if not n.startswith("_")]
    return names


def kit_section() -> str:
    text = (ROOT / "docs" / "plugins.md").read_text()
    return text.split("## The plugin kit", 1)[1].split("\n## ", 1)[0]


def test_every_public_kit_name_is_documented_with_its_signature():
    section = kit_section()
    missing = []
    for module, names in kit_public_names().items():
        if f"aipaint.plugin.kit.{module}" not in section:
            missing.append(module)
        obj_module = importlib.import_module(f"aipaint.plugin.kit.{module}")
        for name in names:
            obj = getattr(obj_module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                if not re.search(rf"^{name}: ", section, re.M):
                    missing.append(name)
                continue
            line = next((ln for ln in section.splitlines() if re.search(rf"\b{name}\(", ln)), None)
            try:
                parameters = [p.name for p in inspect.signature(obj).parameters.values()
                              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            except ValueError:  # a class whose signature Python cannot tell: its name is enough
                parameters = []
            if line is None or any(not re.search(rf"\b{p}\b", line) for p in parameters):
                missing.append(f"{module}.{name}")
    assert missing == []


# --------------------------------------------------------------------------- folders
def test_model_entries_finds_files_and_diffusers_folders_inside_the_root(tmp_path):
    root = tmp_path / "models"
    (root / "sub" / "folder-model").mkdir(parents=True)
    (root / "sub" / "folder-model" / "config.json").write_text("{}")
    (root / "sub" / "folder-model" / "inner.safetensors").write_bytes(b"")
    (root / "a.pth").write_bytes(b"")
    (root / "a.safetensors").write_bytes(b"")
    (tmp_path / "outside.safetensors").write_bytes(b"")
    (root / "escape.safetensors").symlink_to(tmp_path / "outside.safetensors")
    assert model_entries(root) == {"a": root / "a.safetensors", "sub/folder-model": root / "sub" / "folder-model"}
    assert model_entries(tmp_path / "missing") == {}


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "C:\\x", "a/../../x", "~/x", "a//b", "./x"])
def test_a_name_never_leaves_its_folder(tmp_path, name):
    with pytest.raises(NameOutsideFolder, match="must be a name inside"):
        ModelFolder(tmp_path, "upscaler").resolve(name)


def test_a_name_part_longer_than_a_file_system_stores_is_refused(tmp_path):
    with pytest.raises(InvalidParameter, match="at most 255 bytes"):
        ModelFolder(tmp_path, "lora").resolve("x" * 256)


# --------------------------------------------------------------------------- hashing
def test_short_hashes_share_the_one_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(hashing, "_REMEMBERED", {})
    path = tmp_path / "x.safetensors"
    header = b'{"__metadata__":{"a":"1"}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"weights")
    addnet, whole = hashing.short_hash(path), hashing.short_hash(path, addnet=False)
    assert addnet == hashing.sha256_bytes(path, skip_safetensors_header=True)[:12]
    assert whole == hashing.sha256_file(path)[:12] != addnet
    assert len(hashing._REMEMBERED) == 2  # both digests, in the one cache
    # Edited metadata, same length and mtime: the remembered (display) hash stands, the bytes differ.
    stat = path.stat()
    path.write_bytes(len(header).to_bytes(8, "little") + header.replace(b"1", b"2") + b"weights")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert hashing.short_hash(path, addnet=False) == whole != hashing.sha256_bytes(path)[:12]


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize(("value", "expected"), [("on", True), ("No", False), (None, True), (0, False)])
def test_option_bool_reads_yes_and_no_with_parse_bool(value, expected):
    assert option_bool({"flag": value}, "flag", default=True) is expected


def test_option_bool_refuses_anything_else_by_name():
    with pytest.raises(InvalidParameter, match=r"allow_pickle.*'nope'.*true or false"):
        option_bool({"allow_pickle": "nope"}, "allow_pickle")


# --------------------------------------------------------------------------- patches
def test_a_patch_set_restores_half_precision_weights_bit_exactly():
    layer = torch.nn.Linear(8, 8).half()
    before = layer.weight.detach().clone()
    patches = PatchSet()
    delta = torch.randn(8, 8, generator=torch.Generator().manual_seed(0)) * 1e-3
    patches.add("w", layer.weight, delta)
    patches.add("w", layer.weight, delta)  # summed in float32, one write
    with patches.apply() as applied:
        assert applied.targets == ["w"]
        assert torch.equal(layer.weight, (before.float() + 2 * delta).half())
        assert not torch.equal(layer.weight, before)
    assert torch.equal(layer.weight, before)
    applied.restore()  # a second restore does nothing
    assert torch.equal(layer.weight, before)


def test_a_patch_set_that_fails_midway_leaves_the_weights_as_they_were():
    good, bad = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    before = good.weight.detach().clone()
    patches = PatchSet()
    patches.add("good", good.weight, torch.ones(4, 4))
    patches.add("bad", bad.weight, torch.ones(3, 3))  # cannot broadcast
    with pytest.raises(RuntimeError):
        patches.apply()
    assert torch.equal(good.weight, before)


def test_one_patch_key_names_one_parameter():
    patches = PatchSet()
    patches.add("w", torch.nn.Linear(2, 2).weight, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="already names another parameter"):
        patches.add("w", torch.nn.Linear(2, 2).weight, torch.zeros(2, 2))


def test_attribute_patches_put_back_what_the_object_held_itself():
    outer, inner = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    inner.forward = own = lambda x: x  # an instance attribute of its own, e.g. another feature's patch
    with AttributePatches() as patches:
        patches.set(outer, "forward", lambda x: 0)
        patches.set(inner, "forward", lambda x: 1)
        patches.set(inner, "forward", lambda x: 2)  # nested: restored in reverse order
        assert outer(None) == 0 and inner.forward(None) == 2
    assert "forward" not in vars(outer)  # the class's method shows through again
    assert inner.forward is own
    patches.restore()
    assert inner.forward is own


# --------------------------------------------------------------------------- codecs
CODEC = FieldsCodec(f"Unit {INDEX}", (Field("Model", "model"), Field("Weight", "weight", float), Field("Res", None, write=str)),
                    required=("model",))


def test_a_fields_codec_reads_back_what_it_writes_in_index_order():
    params = {**CODEC.write({"model": "ink", "weight": 1, "Res": 512}, index=10),
              **CODEC.write({"model": "paper", "weight": 0.5, "Res": 512}, index=2)}
    assert params["Unit 10"] == "Model: ink, Weight: 1.0, Res: 512"
    assert CODEC.read({**params, "Unrelated": "x"}) == [{"model": "paper", "weight": 0.5}, {"model": "ink", "weight": 1.0}]


def test_a_fields_codec_refuses_what_would_not_read_back():
    with pytest.raises(InvalidParameter, match=r"Unit 0 model.*must not contain"):
        CODEC.write({"model": "a, b", "weight": 1, "Res": 1}, index=0)
    with pytest.raises(InvalidParameter, match=r"Unit 3 Weight.*is not a number"):
        CODEC.read({"Unit 3": "Model: a, Weight: lots"})
    with pytest.raises(InvalidParameter, match="records no Model"):
        CODEC.read({"Unit 0": "Weight: 1.0"})
    assert CODEC.read({"Unit 99999": "Model: a"}) == []  # not a key this codec writes


def test_mapping_and_text_codecs_round_trip():
    hashes = MappingCodec("Lora hashes")
    params = hashes.write({"my: style, v2": "0123456789ab", "ink": "ba9876543210"})
    assert params == {"Lora hashes": "my style v2: 0123456789ab, ink: ba9876543210"}
    assert hashes.read(params) == {"my style v2": "0123456789ab", "ink": "ba9876543210"}
    assert hashes.write({}) == {} and hashes.read({}) == {}
    with pytest.raises(InvalidParameter, match="name: value"):
        hashes.read({"Lora hashes": "no pairs here"})
    numbers = TextCodec("Numbers", lambda xs: " ".join(map(str, xs)), lambda text: [int(x) for x in text.split()])
    assert numbers.read(numbers.write([1, 2])) == [1, 2]
    assert numbers.read({}) is None
