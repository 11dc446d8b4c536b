"""Textual inversion: embeddings used by name in prompts and negative prompts, as in A1111.

Embeddings live in the request's ``embeddings.folder`` option (:class:`EmbeddingOptions`), else ``$AIPAINT_EMBEDDINGS_DIR``,
else ``$AIPAINT_HOME/embeddings``; a file ``EasyNegative.safetensors`` is used wherever a
prompt says ``EasyNegative`` (case-insensitive, as a whole word). The adapter joins a
generation on its own when a prompt names one of them (``AdapterSpec.wants``), adds their
vectors as tokens for that generation only, and records ``TI hashes`` in the infotext. The
generation commands take ``--embeddings-dir DIR``.
See ``docs/lora.md#textual-inversion``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from aipaint import hookimpl
from aipaint.api.options import OptionGroup
from aipaint.errors import InvalidParameter, UnsupportedFeature
from aipaint.plugin.adapters import AdapterActivation, AdapterContext, AdapterSpec
from aipaint.plugin.kit.codecs import MappingCodec

HASHES = MappingCodec("TI hashes")  # A1111's entry: "name: 0123456789ab, …"


@dataclass(frozen=True)
class EmbeddingOptions(OptionGroup):
    """Where this job's embeddings are looked up (``--embeddings-dir`` on the command line)."""

    namespace: ClassVar[str] = "embeddings"
    description: ClassVar[str] = "textual-inversion embeddings: the folder they are read from"
    folder: Path | None = None


def embeddings_folder(folder: Path | str | None = None, *, allow_pickle: bool = False) -> Any:
    """The embeddings folder: ``folder``, else ``$AIPAINT_EMBEDDINGS_DIR``, else ``$AIPAINT_HOME/embeddings``."""
    from aipaint.plugin.kit.folders import ModelFolder, default_folder

    root = Path(folder) if folder is not None else default_folder("AIPAINT_EMBEDDINGS_DIR", "embeddings")
    return ModelFolder(root, "embedding", allow_pickle=allow_pickle,
                       name_example="EasyNegative, written in the prompt, for EasyNegative.safetensors")


def _folder_for(context: AdapterContext) -> Any:
    options = context.request.option(EmbeddingOptions)
    return embeddings_folder(options.folder, allow_pickle=context.request.allow_pickle)


def used_embedding_files(context: AdapterContext) -> dict[str, Path]:
    """Prompt name → file, for the embeddings the prompt or negative prompt mentions."""
    from aipaint_plugins.textual_inversion.embeddings import name_pattern

    text = f"{context.request.prompt}\n{context.request.negative_prompt}"
    by_stem: dict[str, list[Any]] = {}
    for file in _folder_for(context).files():
        by_stem.setdefault(Path(file.name).name, []).append(file)
    used: dict[str, Path] = {}
    for stem, files in by_stem.items():
        if not name_pattern(stem).search(text):
            continue
        if len(files) > 1:
            raise InvalidParameter(
                "embedding", stem, "is ambiguous: " + ", ".join(str(f.path) for f in files), "rename one of the files"
            )
        used[stem] = files[0].path
    return used


def wants(context: AdapterContext) -> bool:
    return bool(used_embedding_files(context))


@contextmanager
def activate(context: AdapterContext) -> Iterator[AdapterActivation]:
    from aipaint_plugins.textual_inversion.embeddings import added_tokens, name_pattern, read_embedding

    from aipaint.plugin.kit.hashing import short_hash

    allow_pickle = context.request.allow_pickle
    files = used_embedding_files(context)
    model = context.model
    if getattr(model, "text_encoder_2", None) is not None or model.text_encoder is None:
        # Only the first encoder would learn the tokens; the second would read placeholders as text.
        raise UnsupportedFeature(
            f"the prompt uses the embedding(s) {', '.join(files)}, but textual inversion supports models with one "
            f"text encoder (SD1.x, SD2.x), not {model.name!r} (family {model.family}); remove the name from the prompt"
        )
    embeddings = [read_embedding(path, name, allow_pickle=allow_pickle) for name, path in files.items()]
    with added_tokens(model.tokenizer, model.text_encoder, embeddings) as spellings:
        # Longest names first, so "bad-hands" is not rewritten as "bad" + "-hands".
        replacements = [(name_pattern(n), spellings[n]) for n in sorted(spellings, key=len, reverse=True)]

        def rewrite(text: str) -> str:
            for pattern, tokens in replacements:
                text = pattern.sub(tokens, text)
            return text

        hashes = {e.name: short_hash(e.path, addnet=False) for e in embeddings}
        yield AdapterActivation(infotext=HASHES.write(hashes), rewrite_text=rewrite)


@hookimpl
def register_options(register: Callable[[type[OptionGroup]], None]) -> None:
    register(EmbeddingOptions)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(
        AdapterSpec(
            name="textual_inversion",
            activate=activate,
            wants=wants,
            aliases=("embedding", "ti"),
            description="textual-inversion embeddings, used by name in prompts",
        )
    )




@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint_plugins.textual_inversion.train import add_train_command

    add_train_command(subparsers)  # aipaint train embedding
    p = subparsers.add_parser("embeddings", help="list textual-inversion embeddings in the embeddings folder")
    p.add_argument("--dir", help="embeddings folder (default: $AIPAINT_EMBEDDINGS_DIR or $AIPAINT_HOME/embeddings)")
    p.set_defaults(func=_cmd_list)

    from aipaint.cli.api import add_request_options_builder, generation_parsers

    for parser in generation_parsers(subparsers):
        parser.add_argument_group("textual inversion").add_argument(
            "--embeddings-dir", metavar="DIR",
            help="the folder of the embeddings prompts name (default: $AIPAINT_EMBEDDINGS_DIR or $AIPAINT_HOME/embeddings)")
        add_request_options_builder(parser, embeddings_dir_option)


def embeddings_dir_option(args: argparse.Namespace, png_params: dict[str, str]) -> dict[str, Any]:
    """``--embeddings-dir DIR`` as the request's ``embeddings.folder`` option."""
    folder = getattr(args, "embeddings_dir", None)
    return {EmbeddingOptions.namespace: {"folder": folder}} if folder else {}


def _cmd_list(args: argparse.Namespace) -> int:
    folder = embeddings_folder(args.dir, allow_pickle=True)
    files = folder.files()
    if not files:
        print(f"no embeddings in {folder.root}")
        return 0
    for file in files:
        note = "  (pickle: needs allow_pickle)" if file.is_pickle else ""
        print(f"{Path(file.name).name:<32} {file.path}{note}")
    return 0
