"""aipaint's first-party plugins, installed as ``aipaint_plugins``.

Each sub-package is declared in ``[project.entry-points.aipaint]`` and loads through
the same path as a third-party plugin.
"""
