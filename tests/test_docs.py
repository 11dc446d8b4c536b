"""Docs stay in step with the code: every hook is documented with its full signature."""

from __future__ import annotations

import inspect
from pathlib import Path

from aipaint.plugin import hookspecs

ROOT = Path(__file__).resolve().parent.parent


def hook_signature(func) -> str:
    sig = inspect.signature(func)
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"{func.__name__}({params}) -> {sig.return_annotation}"


def all_hooks():
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return [f for _, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, marker)]


def test_every_hook_is_documented_with_its_signature():
    doc = (ROOT / "docs" / "plugins.md").read_text()
    hooks = all_hooks()
    assert len(hooks) >= 7
    missing = [hook_signature(h) for h in hooks if hook_signature(h) not in doc]
    assert not missing, f"docs/plugins.md lacks these hook signatures: {missing}"


def test_firstresult_hooks_say_so():
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    for hook in all_hooks():
        if getattr(hook, marker).get("firstresult"):
            assert "firstresult" in hook.__doc__


def test_readme_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    head = readme[:3000]
    assert "aipaint generate" in head and "pytest" in head
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest" in ci and "torch==2.14.1" in ci


def test_every_package_folder_is_listed_in_pyproject():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    mapping = {"aipaint": "aipaint", "plugins": "aipaint_plugins", "zoo": "aipaint_zoo"}
    found = set()
    for top, package in mapping.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            found.add(".".join([package, *rel.parts]))
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_every_plugin_package_has_an_entry_point():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    targets = set(project["project"]["entry-points"]["aipaint"].values())
    plugins = {f"aipaint_plugins.{p.name}" for p in (ROOT / "plugins").iterdir() if (p / "__init__.py").is_file()}
    assert plugins <= targets, f"plugins without an entry point: {sorted(plugins - targets)}"
