"""The ``aipaint serve`` command: the A1111-compatible HTTP API (:mod:`aipaint.serve`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from aipaint.cli.api import add_model_options, load_option_values, parse_key_values
from aipaint.errors import InvalidParameter


def _auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("expected USER:PASSWORD")
    return user, password


def cmd_serve(args: argparse.Namespace) -> int:
    from aipaint.serve.app import ServerConfig, serve

    if not 0 <= args.port <= 65535:
        raise InvalidParameter("--port", args.port, "must be from 0 to 65535")
    for name in ("queue_size", "max_body_mb"):
        if getattr(args, name) < 1:
            raise InvalidParameter(f"--{name.replace('_', '-')}", getattr(args, name), "must be at least 1")
    if args.styles:
        from aipaint.prompt.styles import load_styles

        load_styles(args.styles)  # a bad file is said now, before the model loads
    config = ServerConfig(
        model=args.model,
        models_dir=Path(args.models_dir) if args.models_dir else None,
        lora_dir=Path(args.lora_dir) if args.lora_dir else None,
        output_dir=Path(args.outdir),
        api_auth=args.api_auth,
        cors_origins=tuple(args.cors_allow_origins),
        queue_size=args.queue_size,
        max_body_bytes=args.max_body_mb * 2**20,
        styles_file=Path(args.styles) if args.styles else None,
        load_options={
            "family": args.family, "device": args.device, "dtype": args.dtype, "runtime": args.runtime,
            "allow_pickle": args.allow_pickle, "config": args.config,
            "runtime_options": parse_key_values(args.runtime_options, "--runtime-option"),
            **load_option_values(args),
        },
    )
    serve(config, host=args.host, port=args.port)
    return 0


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve an A1111-compatible HTTP API (OpenAPI at /docs)")
    add_model_options(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=int, default=7860, help="port (default: 7860, as A1111)")
    g.add_argument("--api-auth", type=_auth, metavar="USER:PASSWORD", help="require HTTP basic authentication")
    g.add_argument("--cors-allow-origins", nargs="*", default=[], metavar="ORIGIN",
                   help="origins browsers may call the API from (default: none, CORS off)")
    g.add_argument("--models-dir", metavar="DIR", help="more checkpoints /sdapi/v1/options may switch to, by name")
    g.add_argument("--lora-dir", metavar="DIR",
                   help="the LoRA folder (default: $AIPAINT_LORA_DIR or $AIPAINT_HOME/loras)")
    g.add_argument("--outdir", default="outputs", help="where save_images writes (default: outputs)")
    g.add_argument("--queue-size", type=int, default=16,
                   help="jobs held at once, running and waiting; more are answered 503 (default: 16)")
    g.add_argument("--max-body-mb", type=int, default=32, help="largest request body in MiB (default: 32)")
    g.add_argument("--styles", metavar="FILE",
                   help="A1111's styles.csv (name,prompt,negative_prompt): the prompt styles requests may name")
    p.set_defaults(func=cmd_serve)
