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


def cli_api_signature(func) -> str:
    """``name(a: T, *, b: U = 'x', **c: V) -> R`` as docs/plugins.md writes the CLI API."""
    sig = inspect.signature(func)
    parts, keyword_only = [], False
    for p in sig.parameters.values():
        if p.kind is p.KEYWORD_ONLY and not keyword_only:
            parts.append("*")
            keyword_only = True
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        text = f"{prefix}{p.name}: {p.annotation}"
        if p.default is not p.empty:
            text += f" = {p.default!r}"
        parts.append(text)
    return f"{func.__name__}({', '.join(parts)}) -> {sig.return_annotation}"


def test_every_public_function_of_the_cli_api_is_documented_with_its_signature():
    from aipaint.cli import api

    doc = (ROOT / "docs" / "plugins.md").read_text()
    functions = [getattr(api, name) for name in api.__all__ if inspect.isfunction(getattr(api, name))]
    assert len(functions) >= 10
    missing = [cli_api_signature(f) for f in functions if cli_api_signature(f) not in doc]
    assert not missing, f"docs/plugins.md lacks these aipaint.cli.api signatures: {missing}"
    public = {name for name, value in vars(api).items() if inspect.isfunction(value) and value.__module__ == api.__name__
              and not name.startswith("_")}
    assert public == {f.__name__ for f in functions}, "aipaint.cli.api.__all__ must list every public function"
    undocumented = [name for name in api.__all__ if name not in doc]
    assert not undocumented, f"docs/plugins.md does not name {undocumented}"
    assert "aipaint.cli.main." not in doc and "_generation_request" not in doc
