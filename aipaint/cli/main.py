"""The ``aipaint`` command. Heavy libraries are imported inside commands, so ``--help`` is quick."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from aipaint.errors import AipaintError, AipaintWarning, UnknownName

Command = Callable[[argparse.Namespace], int]

# Core command groups that live in their own modules; each has register_commands(subparsers).
# Plugins add theirs through the register_commands hook.
CORE_COMMAND_MODULES: tuple[str, ...] = ("aipaint.cli.images",)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", help="zoo id, diffusers folder, .safetensors file or hub id (default: the embedded shapes-tiny)")
    g.add_argument("--family", help="model family, when it cannot be detected (see `aipaint plugins`)")
    g.add_argument("--config", help="diffusers config folder for a single-file checkpoint (default: the family's, from the zoo)")
    g.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    g.add_argument("--runtime", default="torch", help="runtime plugin (default: torch)")
    g.add_argument("--runtime-option", action="append", default=[], metavar="KEY=VALUE", dest="runtime_options",
                   help="runtime option, repeatable (e.g. onnx_dir=exported/ for --runtime onnxruntime)")
    g.add_argument("--allow-pickle", action="store_true",
                   help="load .ckpt/.pt files with torch.load(weights_only=True): the model, and files plugins load "
                        "by name (e.g. LoRAs, embeddings, --post upscalers and face restorers)")


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (defaults: the model's, as in the A1111 web UI)")
    g.add_argument("-n", "--negative-prompt", default=None)
    g.add_argument("--steps", type=int)
    g.add_argument("--cfg-scale", "--cfg", type=float, dest="cfg_scale")
    g.add_argument("--sampler", help="sampler name, e.g. 'DPM++ 2M' (see `aipaint samplers`)")
    g.add_argument("--schedule", help="schedule type: Automatic, Karras, Exponential")
    g.add_argument("--seed", type=int, help="-1 for random (default)")
    g.add_argument("--variation-seed", type=int, dest="subseed", metavar="SEED", help="A1111's variation seed (-1: random)")
    g.add_argument("--variation-strength", type=float, dest="subseed_strength", metavar="X",
                   help="how far to move towards the variation seed's noise, 0 to 1 (default 0: off)")
    g.add_argument("--seed-resize-from", type=_size_argument, metavar="WxH",
                   help="draw the seed's noise as at this size, so a seed keeps its composition at a new size")
    g.add_argument("-W", "--width", type=int)
    g.add_argument("-H", "--height", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--clip-skip", type=int)
    g.add_argument("--guidance-rescale", type=float)
    g.add_argument("--skip-early-cfg", type=float, metavar="FRACTION",
                   help="A1111's 'Ignore negative prompt during early sampling': the first steps up to this "
                        "fraction run without CFG, which is faster (default 0: none)")
    g.add_argument("--midjourney", "--mj", action="store_true", help="read the prompt in Midjourney syntax (--no, ::, --ar)")
    g.add_argument("-o", "--output", help="output PNG (default: aipaint.png, or aipaint-1.png, … the first name not "
                                         "taken); a batch adds -0, -1, …")
    g.add_argument("--no-progress", action="store_true")


GENERATION_FIELDS = ("steps", "cfg_scale", "sampler", "schedule", "seed", "width", "height", "batch_size", "clip_skip", "guidance_rescale",
                     "skip_early_cfg", "subseed", "subseed_strength")


def _size_argument(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 512x768, not {text!r}")
    return int(width), int(height)


def _progress_bar(enabled: bool, unit: str = "step") -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, unit=unit, file=sys.stderr, leave=False)
        bar["bar"].total = total
        bar["bar"].n = done
        bar["bar"].refresh()

    def close() -> None:
        if "bar" in bar:
            bar["bar"].close()

    return update, close


LOADED_PIPELINE = "loaded_pipeline"


def _load(args: argparse.Namespace):
    """The pipeline for the command's model options, loaded once per command: a Midjourney
    ``--ar`` needs the model's default size before the request is built."""
    loaded = getattr(args, LOADED_PIPELINE, None)
    if loaded is not None:
        return loaded
    import transformers

    import aipaint

    transformers.utils.logging.disable_progress_bar()  # the CLI shows its own progress

    loaded = aipaint.load(
        args.model,
        family=args.family,
        device=args.device,
        dtype=args.dtype,
        runtime=args.runtime,
        allow_pickle=args.allow_pickle,
        config=args.config,
        runtime_options=parse_key_values(getattr(args, "runtime_options", None) or [], "--runtime-option"),
    )
    setattr(args, LOADED_PIPELINE, loaded)
    return loaded


def parse_key_values(items: Sequence[str], flag: str) -> dict[str, Any]:
    """``["a=1", "b=x"]`` → ``{"a": 1, "b": "x"}``; values are read as JSON when they parse, else kept as text."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise AipaintError(f"{flag} expects KEY=VALUE, got {item!r}")
        try:
            parsed[key.strip()] = json.loads(value)
        except ValueError:
            parsed[key.strip()] = value
    return parsed


def command_group(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """The sub-command group ``aipaint NAME TARGET``, created by whichever plugin asks first,
    so several plugins can add targets to one group (``aipaint export onnx``, ``aipaint export tensorrt``)."""
    parser = subparsers.choices.get(name)
    if parser is None:
        parser = subparsers.add_parser(name, help=help)
        group = parser.add_subparsers(dest=f"{name}_target", metavar="TARGET")
        parser.set_defaults(func=lambda args: parser.print_help() or 0, aipaint_command_group=group)
    group = parser.get_default("aipaint_command_group")
    if group is None:
        raise AipaintError(f"the command {name!r} exists and is not a command group")
    return group


GENERATION_COMMANDS = ("generate", "img2img", "inpaint", "outpaint")
"""The commands that generate an image from a request; plugins add their generation options to each."""


GENERATION_COMMAND_MARK = "aipaint_generation_command"


def mark_generation_command(parser: argparse.ArgumentParser) -> None:
    """Declare a plugin's command a generation command: the options other plugins add to the
    generation commands (``--lora-dir``, ``--controlnet``, ``--deepcache``, …) are added to it too,
    and reach its request when it builds one with the generation options (as ``aipaint video`` does).

    Plugins add those options from their own ``register_commands``, so the command must exist by
    then: register it from a ``@hookimpl(tryfirst=True)`` ``register_commands``."""
    parser.set_defaults(**{GENERATION_COMMAND_MARK: True})


def generation_parsers(subparsers: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:
    """The parsers of the generation commands that exist, each once (``txt2img`` is ``generate``'s alias),
    then those a plugin marked with :func:`mark_generation_command`: where a plugin adds its
    generation options."""
    parsers: list[argparse.ArgumentParser] = []
    marked = [parser for parser in subparsers.choices.values() if parser.get_default(GENERATION_COMMAND_MARK)]
    for parser in [*(subparsers.choices.get(name) for name in GENERATION_COMMANDS), *marked]:
        if parser is not None and all(parser is not known for known in parsers):
            parsers.append(parser)
    return parsers

ADAPTER_UNIT_BUILDERS = "adapter_unit_builders"


def add_adapter_unit_builder(parser: argparse.ArgumentParser, build: Callable[[argparse.Namespace, dict[str, str]], list[Any]]) -> None:
    """Let a plugin that added options to a generation command (e.g. ``--controlnet``) turn them into
    adapter units: ``build(args, png_params)`` returns :class:`aipaint.plugin.adapters.AdapterUnit` objects;
    ``png_params`` are the parameters recorded in ``--from-png``'s PNG (empty without it)."""
    parser.set_defaults(**{ADAPTER_UNIT_BUILDERS: [*(parser.get_default(ADAPTER_UNIT_BUILDERS) or []), build]})


REQUEST_OPTIONS_BUILDERS = "request_options_builders"


def add_request_options_builder(parser: argparse.ArgumentParser, build: Callable[[argparse.Namespace, dict[str, str]], dict[str, Any]]) -> None:
    """Let a plugin that added options to a generation command (e.g. ``--lora-dir``) pass them to its
    typed option group: ``build(args, png_params)`` returns ``{namespace: {field: value}}`` for
    :attr:`aipaint.api.request.GenerationRequest.options` (empty when its options were not given);
    ``png_params`` as for :func:`add_adapter_unit_builder`."""
    parser.set_defaults(**{REQUEST_OPTIONS_BUILDERS: [*(parser.get_default(REQUEST_OPTIONS_BUILDERS) or []), build]})


def _available_here(card: Any) -> str | None:
    """Why the zoo model ``card`` cannot be loaded here without a download, or None when it can."""
    from pathlib import Path

    from aipaint.models import zoo

    if card.family not in _host().registry.families:
        return f"it needs the model family {card.family!r}, which no installed plugin provides"
    source = card.source
    kind = source.get("kind")
    if kind == "embedded" and (zoo.zoo_root() / source.get("path", "")).exists():
        return None
    if kind == "local" and Path(source.get("path", "")).expanduser().exists():
        return None
    if kind == "hub":
        try:
            import huggingface_hub

            if source.get("file"):
                if isinstance(huggingface_hub.try_to_load_from_cache(source["repo"], source["file"]), str):
                    return None
            else:
                huggingface_hub.snapshot_download(source["repo"], local_files_only=True)
                return None
        except Exception:  # not in the local cache (the error types vary between hub versions)
            pass
        return "it is not downloaded yet"
    return "its files are not on this machine"


def _model_from_png(args: argparse.Namespace, params: dict[str, str]) -> None:
    """``--from-png`` without ``-m``: use the model the PNG names when it is a zoo model available here,
    else keep the default and say on stderr which model the PNG names."""
    from aipaint.models import zoo

    name = params.get("Model", "").strip()
    digest = params.get("Model hash", "").strip().lower()
    if not name and not digest:
        return
    card = zoo.find(name) if name else None
    if card is None and len(digest) >= 8:  # A1111's short hash: the first 10 hex digits of the file's sha256
        card = next((c for c in zoo.cards() if any(str(f.get("sha256", "")).lower().startswith(digest) for f in c.files)), None)
    problem = _available_here(card) if card is not None else None
    if card is not None and problem is None:
        args.model = card.id
        return
    named = f"the model {name!r}" + (f" (hash {digest})" if digest else "") if name else f"the model of hash {digest}"
    if card is not None:
        why, advice = f"the zoo model {card.id!r}, but {problem}", f"pass -m {card.id} to use it"
    else:
        why, advice = "which is not in the zoo", "pass -m with that model (a file, folder or hub id) to use it"
    print(f"aipaint: warning: {args.from_png} was made with {named}, {why}; using the default model "
          f"{zoo.DEFAULT_MODEL!r} instead ({advice})", file=sys.stderr)


def _generation_request(args: argparse.Namespace) -> Any:
    kwargs: dict[str, Any] = {}
    png_params: dict[str, str] = {}
    if args.from_png:
        from aipaint.infotext import Infotext, generation_kwargs, read_png_parameters

        text = read_png_parameters(args.from_png)
        if not text:
            raise AipaintError(f"{args.from_png} carries no generation parameters to regenerate from")
        info = Infotext.from_text(text)
        png_params = info.params
        kwargs.update(generation_kwargs(info))
        size = info.size()
        if size and "width" not in kwargs and getattr(args, "image", None) is None:
            # An outpainted PNG's Size is its canvas, which generation_kwargs leaves to
            # outpainting (it works the canvas out from the image); txt2img redraws that
            # canvas. The image commands keep their input image's size.
            kwargs["width"], kwargs["height"] = size
        if args.model is None:
            _model_from_png(args, png_params)
    if args.prompt is not None:
        kwargs["prompt"] = args.prompt
    if "prompt" not in kwargs:
        raise AipaintError("give a prompt, or --from-png with an image that carries one")
    if args.negative_prompt is not None:
        kwargs["negative_prompt"] = args.negative_prompt
    for name in GENERATION_FIELDS:
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    if args.seed_resize_from:
        kwargs["seed_resize_from_w"], kwargs["seed_resize_from_h"] = args.seed_resize_from
    if args.midjourney:
        from aipaint.prompt import parse_midjourney

        mj = parse_midjourney(kwargs["prompt"])
        kwargs["prompt"] = mj.prompt
        if mj.negative:
            kwargs["negative_prompt"] = ", ".join(p for p in (kwargs.get("negative_prompt", ""), mj.negative) if p)
        resolved = {"seed": mj.seed, "steps": mj.steps}
        if mj.aspect is not None and (args.width is None or args.height is None):
            _checked_request(kwargs)  # the rest of the request, before a mistake in it costs a model load
            defaults = _load(args).model.defaults  # --ar scales the model's own default size
            resolved["width"], resolved["height"] = mj.size_for(defaults.width, defaults.height)
        for name, value in resolved.items():
            if value is not None and getattr(args, name) is None:
                kwargs[name] = value
    units = [unit for build in getattr(args, ADAPTER_UNIT_BUILDERS, None) or () for unit in build(args, png_params)]
    if units:
        kwargs["adapters"] = (*kwargs.get("adapters", ()), *units)
    # --allow-pickle is the user's opt-in for every file of this run, so it reaches the adapters too.
    if args.allow_pickle:
        kwargs["allow_pickle"] = True
    options: dict[str, dict[str, Any]] = {}
    for build in getattr(args, REQUEST_OPTIONS_BUILDERS, None) or ():
        for namespace, values in build(args, png_params).items():
            options.setdefault(namespace, {}).update(values)
    if options:
        kwargs["options"] = options
    return _checked_request(kwargs)


def _checked_request(kwargs: dict[str, Any]) -> Any:
    """The request, validated, with its sampler and schedule names checked against the installed
    samplers too: all that can be checked before the model loads (its defaults fill the rest)."""
    from aipaint.api.request import GenerationRequest

    request = GenerationRequest(**kwargs)
    samplers = _host().registry.samplers
    if request.sampler is not None:
        spec = samplers.get(request.sampler)
        if request.schedule is not None:
            spec.check_schedule(request.schedule)
    elif request.schedule is not None:  # the model's default sampler is known only once it loads
        known = list(dict.fromkeys(schedule for spec in samplers for schedule in spec.schedules))
        if request.schedule.lower() not in (schedule.lower() for schedule in known):
            raise UnknownName("schedule", request.schedule, known)
    return request


def _post_chain(texts: Sequence[str], allow_pickle: bool = False) -> list[Any]:
    """The ``--post`` steps, parsed and checked against the registered post-processors (names,
    aliases, option names) before any model is loaded, so a typo costs no generation.

    ``allow_pickle`` (``--allow-pickle``, the user's opt-in for the run) reaches the steps whose
    post-processor takes an ``allow_pickle`` option, unless a step sets its own."""
    from aipaint.postprocess import PostStep, check_chain

    steps = [PostStep.parse(text) for text in texts]
    resolved = check_chain(steps, _host())
    if allow_pickle:
        steps = [PostStep(step.name, {"allow_pickle": True, **step.options}) if "allow_pickle" in spec.options else step
                 for spec, step in resolved]
    return steps


def cmd_generate(args: argparse.Namespace) -> int:
    request = _generation_request(args)
    return run_and_save(args, lambda pipe, progress: pipe.generate(request, progress=progress), images=request.batch_size)


def run_and_save(args: argparse.Namespace, generate: Callable[[Any, Any], Any], *, images: int | None) -> int:
    """The end of every generation command: ``generate(pipe, progress)`` with a progress bar,
    then the ``--post`` chain, then the files, one path a line. The chain and, for ``images``
    files, the output path (``-o``, ``--overwrite``) are checked before the model loads;
    ``images=None`` leaves the output to be checked when the files are written."""
    from aipaint.api.result import output_path

    post = _post_chain(getattr(args, "post", None) or [], args.allow_pickle)
    if images is not None:
        output_path(args.output, images, overwrite=args.overwrite)
    pipe = _load(args)
    progress, close = _progress_bar(not args.no_progress and sys.stderr.isatty())
    try:
        result = generate(pipe, progress)
        if post:
            from aipaint.postprocess import postprocess_result

            result = postprocess_result(result, post, pipe)
    finally:
        close()
    # Without -o the free name is picked again: another run may have taken the first one meanwhile.
    output = output_path(args.output, len(result.images), overwrite=args.overwrite)
    for path in result.save_all(output, overwrite=args.overwrite):
        print(path)
    print(f"seed {result.seeds[0]}, {result.timings['total']:.2f} s", file=sys.stderr)
    return 0


def add_overwrite_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (default: an existing -o file is an error, checked before "
                        "generating)")


def add_post_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--post", action="append", default=[], metavar="NAME[:k=v,...]",
                   help="post-processor to run on each image, repeatable, in order (e.g. hires:scale=2, facefix, "
                        "upscale:upscaler=Lanczos); see `aipaint plugins`")


def cmd_info(args: argparse.Namespace) -> int:
    from aipaint.infotext import Infotext, read_png_parameters

    text = read_png_parameters(args.image)
    if text is None:
        print(f"{args.image}: no generation parameters", file=sys.stderr)
        return 1
    if args.json:
        info = Infotext.from_text(text)
        print(json.dumps({"prompt": info.prompt, "negative_prompt": info.negative_prompt, "parameters": info.params}, indent=2))
    else:
        print(text)
    return 0


def _host():
    from aipaint.plugin.host import default_host

    return default_host()


def cmd_samplers(args: argparse.Namespace) -> int:
    registry = _host().registry.samplers
    for spec in registry:
        print(f"{spec.name:<14} schedules: {', '.join(spec.schedules):<32} ({registry.owners[spec.name]})")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    host = _host()
    print("plugins:", ", ".join(host.plugin_names()))
    reg = host.registry
    for title, cat in (
        ("model families", reg.families),
        ("samplers", reg.samplers),
        ("adapters", reg.adapters),
        ("post-processors", reg.postprocessors),
        ("preprocessors", reg.preprocessors),
        ("runtimes", reg.runtimes),
    ):
        names = ", ".join(f"{n} [{cat.owners[n]}]" for n in cat.names()) or "none"
        print(f"{title}: {names}")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from aipaint.models import zoo

    for card in zoo.cards():
        marker = " (default)" if card.id == zoo.DEFAULT_MODEL else ""
        print(f"{card.id:<22} {card.family:<8} {card.source.get('kind'):<9} {card.license:<26} {card.description}{marker}")
    return 0


def cmd_prompt(args: argparse.Namespace) -> int:
    from aipaint.api.request import MAX_PROMPT_CHARS, STEPS_RANGE
    from aipaint.errors import InvalidParameter
    from aipaint.prompt import describe, parse_midjourney, parse_prompt

    text = args.prompt
    steps = args.steps
    # The same limits as a generation's, checked before any work (--mj and token counts load the model).
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidParameter("prompt", f"<{len(text)} characters>", f"must be at most {MAX_PROMPT_CHARS} characters")
    if steps is not None and not STEPS_RANGE[0] <= steps <= STEPS_RANGE[1]:
        raise InvalidParameter("steps", steps, f"must be from {STEPS_RANGE[0]} to {STEPS_RANGE[1]}")
    if args.midjourney:
        mj = parse_midjourney(text)
        text = mj.prompt
        if mj.negative:
            print(f"negative prompt: {mj.negative}")
        defaults = _load(args).model.defaults
        width, height = mj.size_for(defaults.width, defaults.height)
        if mj.aspect is None:
            print(f"size: {width}x{height} (the model's default; no --ar given)")
        else:
            print(f"size: {width}x{height} (--ar {mj.aspect[0]}:{mj.aspect[1]} at the pixel count of the model's "
                  f"default {defaults.width}x{defaults.height})")
        print(f"seed: {mj.seed}" if mj.seed is not None else "seed: random (no --seed given)")
        if steps is None:
            steps = mj.steps
    tokenizer = None
    if not args.no_tokens:
        from aipaint.loading import resolve_source
        from aipaint.models import zoo

        source = resolve_source(args.model or zoo.DEFAULT_MODEL, allow_pickle=args.allow_pickle)
        from transformers import CLIPTokenizer

        if (source.path / "tokenizer").is_dir():
            tokenizer = CLIPTokenizer.from_pretrained(source.path / "tokenizer")
    print(describe(parse_prompt(text), tokenizer=tokenizer, steps=20 if steps is None else steps))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from aipaint.imageutil import load_image
    from aipaint.world.evaluate import adherence, read_scene
    from aipaint.world.scene import POSITION_PHRASES

    image = load_image(args.image)
    reading = read_scene(image)
    print(f"background: {reading.background}")
    for obj in reading.objects:
        print(f"object: a {obj.size} {obj.colour} {obj.shape} {POSITION_PHRASES[obj.position]} "
              f"(centre {obj.cx:.1f},{obj.cy:.1f}; extent {obj.extent:.1f} px)")
    if not reading.objects:
        print("object: none found")
    if args.caption:
        score = adherence(image, args.caption, reading)
        print(f"adherence: {score.score:.3f} ({score.matched}/{score.total} attributes"
              f"{', all correct' if score.all_correct else ''})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aipaint", description="AI painting: Stable Diffusion and friends, A1111-compatible.")
    from aipaint import __version__

    parser.add_argument("--version", action="version", version=f"aipaint {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="text to image", aliases=["txt2img"])
    p.add_argument("prompt", nargs="?", help="the prompt (A1111 syntax)")
    p.add_argument("--from-png", help="regenerate from the parameters stored in an A1111-style PNG")
    add_post_option(p)
    add_overwrite_option(p)
    _add_generation_options(p)
    _add_model_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="print the generation parameters of a PNG")
    p.add_argument("image")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("samplers", help="list samplers and their schedule types")
    p.set_defaults(func=cmd_samplers)
    p = sub.add_parser("plugins", help="list loaded plugins and what they registered")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("zoo", help="list models in the zoo")
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("prompt", help="show how a prompt is understood")
    p.add_argument("prompt")
    p.add_argument("--steps", type=int, help="steps to show the schedule for (default: a Midjourney --steps, else 20)")
    p.add_argument("--midjourney", "--mj", action="store_true",
                   help="read the prompt in Midjourney syntax and print the size and seed it resolves to (loads the model)")
    p.add_argument("--no-tokens", action="store_true", help="skip token counting")
    _add_model_options(p)
    p.set_defaults(func=cmd_prompt)

    p = sub.add_parser("eval", help="read a shapes-world image and score it against a caption")
    p.add_argument("image")
    p.add_argument("--caption")
    p.set_defaults(func=cmd_eval)

    import importlib

    for module_name in CORE_COMMAND_MODULES:
        importlib.import_module(module_name).register_commands(sub)
    from aipaint.plugin.host import create_plugin_host

    create_plugin_host(run_registration=False).hook.register_commands(subparsers=sub)
    return parser


@contextlib.contextmanager
def plain_warnings() -> Any:
    """aipaint's own warnings as one ``aipaint: warning: ...`` line each, once per command
    (a hires-fix pass or a batch re-plans the same prompt; its warning is said once).
    Other warnings keep Python's own form."""
    seen: set[str] = set()
    shown = warnings.showwarning

    def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if not issubclass(category, AipaintWarning):
            shown(message, category, *args, **kwargs)
            return
        text = str(message).removeprefix("aipaint: ")
        if text not in seen:
            seen.add(text)
            print(f"aipaint: warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", AipaintWarning)  # ``seen`` dedupes; Python's per-line registry would not
        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    with plain_warnings():
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except AipaintError as exc:
        print(f"aipaint: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aipaint: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
