"""What a plain (non-editable) install gets: every package folder, and the zoo's data files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_ROOTS = {"aipaint": ROOT / "aipaint", "aipaint_plugins": ROOT / "plugins", "aipaint_zoo": ROOT / "zoo"}


def declared() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_declared():
    found = set()
    for package, folder in PACKAGE_ROOTS.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder).parts
            found.add(".".join((package, *relative)))
    assert found == set(declared()["packages"])


def zoo_data_files() -> set[str]:
    """The files a user of the wheel needs from zoo/: cards, offline configs, embedded models."""
    zoo = ROOT / "zoo"
    wanted = set()
    for path in zoo.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".safetensors", ".txt"} and "__pycache__" not in path.parts:
            relative = path.relative_to(zoo)
            if relative.parts[0] in {"cards", "configs"} or (relative.parts[0] == "models" and len(relative.parts) > 2):
                wanted.add("aipaint_zoo/" + relative.as_posix())
    return wanted


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to copy the tracked tree")
def test_the_wheel_carries_the_zoo(tmp_path):
    pytest.importorskip("setuptools")
    # Build from a copy of the tracked files, so the build leaves nothing in the checkout.
    source = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, tracked):
        target = source / name.decode()
        if (ROOT / name.decode()).is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name.decode(), target)
    # setuptools' PEP 517 build_wheel hook, the one pip calls, without pip's start and its separate metadata pass
    build = "import sys; from setuptools import build_meta; build_meta.build_wheel(sys.argv[1])"
    subprocess.run([sys.executable, "-c", build, str(tmp_path / "wheel")], cwd=source, check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("aipaint-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {name for name in zoo_data_files() if (source / "zoo" / name.removeprefix("aipaint_zoo/")).exists()}
    assert "aipaint_zoo/models/shapes-tiny/unet/diffusion_pytorch_model.safetensors" in wanted
    assert wanted - names == set()
    assert not any(name.endswith(".log") for name in names)
