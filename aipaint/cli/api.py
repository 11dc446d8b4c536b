"""The public API of the ``aipaint`` command line: what plugin commands build on.

A plugin adds commands from its ``register_commands(subparsers)`` hook and uses only the
names here (see docs/plugins.md, "Command line"): the model and generation options every
command shares, loading the pipeline they name, the request they describe, progress bars,
command groups several plugins add to (``aipaint train …``, ``aipaint export …``), and the
builders through which options a plugin adds to the generation commands reach the request.

Heavy libraries (torch, diffusers) are imported inside the functions that need them: the
parser is built for ``aipaint --help``, which must stay quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from aipaint.errors import AipaintError, InvalidParameter, UnknownName

if TYPE_CHECKING:
    from aipaint.api.request import GenerationRequest
    from aipaint.pipeline import Pipeline
    from aipaint.plugin.adapters import AdapterUnit

__all__ = [
    "Command", "ProgressCallback", "GENERATION_COMMANDS",
    "add_model_options", "add_generation_options", "add_run_options", "add_overwrite_option", "add_post_option",
    "parse_key_values", "load_option_values", "load_pipeline", "build_request", "progress_bar", "run_and_save",
    "command_group", "generation_parsers", "mark_generation_command",
    "add_adapter_unit_builder", "add_request_options_builder", "check_post_chain",
]

Command = Callable[[argparse.Namespace], int]
"""A command's handler: ``handler(args) -> exit status``; set with ``parser.set_defaults(func=handler)``."""

ProgressCallback = Callable[[int, int], None]
"""``progress(done, total)``, as :meth:`aipaint.pipeline.Pipeline.generate` calls it."""

GENERATION_COMMANDS = ("generate", "img2img", "inpaint", "outpaint", "variations", "blend")
"""The core commands that generate from a request; plugins add their generation options to each."""

# Request fields taken as they are from the generation options of the same name.
GENERATION_FIELDS = ("steps", "cfg_scale", "sampler", "schedule", "seed", "width", "height", "batch_size", "clip_skip",
                     "guidance_rescale", "skip_early_cfg", "subseed", "subseed_strength", "refiner_switch_at")

# Names under which the parser's defaults carry what plugins registered on a command.
_LOADED_PIPELINE = "loaded_pipeline"
_GROUP = "aipaint_command_group"
_GENERATION_MARK = "aipaint_generation_command"
_UNIT_BUILDERS = "adapter_unit_builders"
_OPTIONS_BUILDERS = "request_options_builders"


# --- options every command shares ------------------------------------------------------------
def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Add the options that choose and load a model (``-m``, ``--family``, ``--device``, ``--dtype``,
    ``--runtime``, ``--allow-pickle``, …); :func:`load_pipeline` reads them."""
    g = parser.add_argument_group("model")
    g.add_argument("-m", "--model", help="zoo id, diffusers folder, .safetensors file or hub id (default: the embedded shapes-tiny)")
    g.add_argument("--family", help="model family, when it cannot be detected (see `aipaint plugins`)")
    g.add_argument("--config", help="diffusers config folder for a single-file checkpoint (default: the family's, from the zoo)")
    g.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    g.add_argument("--runtime", default="torch", help="runtime plugin (default: torch)")
    g.add_argument("--runtime-option", action="append", default=[], metavar="KEY=VALUE", dest="runtime_options",
                   help="runtime option, repeatable (e.g. onnx_dir=exported/ for --runtime onnxruntime)")
    g.add_argument("--load-option", action="append", default=[], metavar="KEY=VALUE", dest="load_options",
                   help="the model family's own load setting, repeatable (each family's page in docs/ lists its "
                        "settings); a name the family does not take is refused")
    g.add_argument("--allow-pickle", action="store_true",
                   help="load .ckpt/.pt files with torch.load(weights_only=True): the model, and files plugins load "
                        "by name (e.g. LoRAs, embeddings, --post upscalers and face restorers)")


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """Add the options of a generation request (``--steps``, ``--seed``, ``--option NS.FIELD=VALUE``,
    ``-o``, …); :func:`build_request` reads them. The command's own positional ``prompt`` and
    ``--from-png`` are the caller's to add."""
    g = parser.add_argument_group("generation (defaults: the model's, as in the A1111 web UI)")
    g.add_argument("-n", "--negative-prompt", default=None)
    g.add_argument("--steps", type=int)
    g.add_argument("--cfg-scale", "--cfg", type=float, dest="cfg_scale")
    g.add_argument("--sampler", help="sampler name, e.g. 'DPM++ 2M' (see `aipaint samplers`)")
    g.add_argument("--schedule", help="schedule type: Automatic, Karras, Exponential, SGM Uniform")
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
    g.add_argument("--style", action="append", dest="styles", metavar="NAME",
                   help="apply a saved prompt style (A1111's styles.csv); repeat for several, applied in order")
    g.add_argument("--styles-file", metavar="FILE",
                   help="the styles file (default: $AIPAINT_STYLES_FILE, else $AIPAINT_HOME/styles.csv)")
    g.add_argument("--trigger-words", action="store_true",
                   help="add the trigger words of the prompt's <lora:…> LoRAs (from the cards `aipaint get` keeps "
                        "beside them) to the front of the prompt")
    g.add_argument("--option", action="append", default=[], metavar="NS.FIELD=VALUE", dest="plugin_options",
                   help="a plugin's typed option, repeatable (e.g. lora.folder=my/loras); see `aipaint plugins`")
    g.add_argument("-o", "--output", help="output PNG (default: aipaint.png, or aipaint-1.png, … the first name not "
                                         "taken); a batch adds -0, -1, …")
    g.add_argument("--no-progress", action="store_true")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Add the options :func:`run_and_save` acts on while it runs the request: ``--refiner MODEL``,
    ``--refiner-switch-at F`` and ``--preview FILE.png``. Only for commands that end in
    :func:`run_and_save`: elsewhere nothing would act on them."""
    g = parser.add_argument_group("run")
    g.add_argument("--refiner", metavar="MODEL",
                   help="A1111's refiner: a second model (as for -m) that takes over for the last steps")
    g.add_argument("--refiner-switch-at", type=float, metavar="F",
                   help="fraction of the noise schedule the main model runs before the refiner (default 0.8)")
    g.add_argument("--preview", metavar="FILE.png",
                   help="write a cheap preview of each step's estimate to this PNG (replaced atomically)")


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--overwrite``: replace existing output files (otherwise an existing ``-o`` file is an error)."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing output files (default: an existing -o file is an error, checked before "
                             "generating)")


def add_post_option(parser: argparse.ArgumentParser) -> None:
    """Add the repeatable ``--post NAME[:k=v,...]`` chain that :func:`run_and_save` runs on each image."""
    parser.add_argument("--post", action="append", default=[], metavar="NAME[:k=v,...]",
                        help="post-processor to run on each image, repeatable, in order (e.g. hires:scale=2, facefix, "
                             "upscale:upscaler=Lanczos); see `aipaint plugins`")


def _size_argument(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 512x768, not {text!r}")
    return int(width), int(height)


def parse_key_values(items: Sequence[str], flag: str) -> dict[str, Any]:
    """``["a=1", "b=x"]`` → ``{"a": 1, "b": "x"}``; values are read as JSON when they parse, else kept
    as text. ``flag`` names the option in the error for an item that is not ``KEY=VALUE``."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidParameter(flag, item, "must be KEY=VALUE")
        try:
            parsed[key.strip()] = json.loads(value)
        except ValueError:
            parsed[key.strip()] = value
    return parsed


def load_option_values(args: argparse.Namespace) -> dict[str, Any]:
    """``--load-option KEY=VALUE`` items as keyword arguments of ``aipaint.load``; the names
    ``aipaint.load`` takes itself (``device``, ``runtime_options``, …) have their own flags."""
    values = parse_key_values(getattr(args, "load_options", None) or [], "--load-option")
    reserved = sorted(set(values) & {"family", "device", "dtype", "runtime", "allow_pickle", "config", "runtime_options",
                                     "host", "source"})
    if reserved:
        raise InvalidParameter("--load-option", reserved[0], f"{reserved[0]} has its own flag (see --help)")
    return values


# --- the model and the request ------------------------------------------------------------
def load_pipeline(args: argparse.Namespace) -> Pipeline:
    """The pipeline the :func:`add_model_options` options name, loaded once per command (a
    Midjourney ``--ar`` needs the model's default size while the request is being built)."""
    loaded = getattr(args, _LOADED_PIPELINE, None)
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
        **load_option_values(args),
    )
    setattr(args, _LOADED_PIPELINE, loaded)
    return loaded


def _load_refiner(args: argparse.Namespace) -> Pipeline:
    """``--refiner MODEL``, loaded as ``-m`` is, on the same device and dtype. Its family is
    detected, and it runs on the torch runtime: ``--family``, ``--config`` and the runtime
    options describe the main model's files."""
    import aipaint

    return aipaint.load(args.refiner, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle)


def build_request(args: argparse.Namespace, **fields: Any) -> GenerationRequest:
    """The request the generation options describe: ``--from-png``'s parameters, overridden by
    the options given, plus ``fields`` (a command's own, e.g. ``init_image``), the adapter units
    and option groups plugins' builders return, and ``--option``.

    Checked before any model loads, as far as it can be: its fields, the sampler and schedule
    names, and the plugin options' namespaces and fields. Without a prompt (and none in
    ``--from-png``'s PNG) it is an error, unless ``fields`` gives image prompts."""
    from aipaint.api.options import parse_assignments
    from aipaint.cli.frompng import png_request_fields

    kwargs: dict[str, Any] = {}
    png_params: dict[str, str] = {}
    if getattr(args, "from_png", None):
        png_fields, png_params = png_request_fields(args)
        kwargs.update(png_fields)
    if getattr(args, "prompt", None) is not None:
        kwargs["prompt"] = args.prompt
    if "prompt" not in kwargs:
        if not fields.get("image_prompts"):
            raise AipaintError("give a prompt, or --from-png with an image that carries one")
        kwargs["prompt"] = ""
    if args.negative_prompt is not None:
        kwargs["negative_prompt"] = args.negative_prompt
    for name in GENERATION_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            kwargs[name] = value
    if args.seed_resize_from:
        kwargs["seed_resize_from_w"], kwargs["seed_resize_from_h"] = args.seed_resize_from
    if getattr(args, "styles", None):
        from aipaint.cli.styles import apply_style_options

        apply_style_options(args, kwargs)
    if args.midjourney:
        _apply_midjourney(args, kwargs)
    if getattr(args, "trigger_words", False):
        from aipaint.sources import prompt_with_trigger_words

        kwargs["prompt"], added = prompt_with_trigger_words(kwargs["prompt"])
        if added:
            print(f"trigger words added: {', '.join(added)}", file=sys.stderr)
    units = [unit for build in getattr(args, _UNIT_BUILDERS, None) or () for unit in build(args, png_params)]
    if units:
        kwargs["adapters"] = (*kwargs.get("adapters", ()), *units)
    # --allow-pickle is the user's opt-in for every file of this run, so it reaches the adapters too.
    if args.allow_pickle:
        kwargs["allow_pickle"] = True
    options: dict[str, dict[str, Any]] = {}
    builds = [build(args, png_params) for build in getattr(args, _OPTIONS_BUILDERS, None) or ()]
    for built in [*builds, parse_assignments(getattr(args, "plugin_options", None) or [])]:
        for namespace, values in built.items():
            options.setdefault(namespace, {}).update(values)
    if options:
        kwargs["options"] = options
    kwargs.update(fields)
    return _checked_request(kwargs)


def _apply_midjourney(args: argparse.Namespace, kwargs: dict[str, Any]) -> None:
    from aipaint.prompt import parse_midjourney

    mj = parse_midjourney(kwargs["prompt"])
    kwargs["prompt"] = mj.prompt
    if mj.negative:
        kwargs["negative_prompt"] = ", ".join(p for p in (kwargs.get("negative_prompt", ""), mj.negative) if p)
    resolved = {"seed": mj.seed, "steps": mj.steps}
    if mj.aspect is not None and (args.width is None or args.height is None):
        _checked_request(kwargs)  # the rest of the request, before a mistake in it costs a model load
        defaults = load_pipeline(args).model.defaults  # --ar scales the model's own default size
        resolved["width"], resolved["height"] = mj.size_for(defaults.width, defaults.height)
    for name, value in resolved.items():
        if value is not None and getattr(args, name) is None:
            kwargs[name] = value


def _checked_request(kwargs: dict[str, Any]) -> GenerationRequest:
    """The request, validated, its sampler and schedule names and its plugin options checked
    against the installed plugins too: all that can be checked before the model loads (its
    defaults fill the rest). The names are checked first, before the request reads its images."""
    from aipaint.api.request import GenerationRequest
    from aipaint.plugin.host import default_host

    registry = default_host().registry
    sampler, schedule = kwargs.get("sampler"), kwargs.get("schedule")
    if isinstance(sampler, str):
        spec = registry.samplers.get(sampler)
        if isinstance(schedule, str):
            spec.check_schedule(schedule)
    elif isinstance(schedule, str):  # the model's default sampler is known only once it loads
        known = list(dict.fromkeys(name for spec in registry.samplers for name in spec.schedules))
        if schedule.lower() not in (name.lower() for name in known):
            raise UnknownName("schedule", schedule, known)
    return GenerationRequest(**kwargs).with_typed_options(registry.options)


def check_post_chain(texts: Sequence[str], allow_pickle: bool = False) -> list[Any]:
    """The ``--post`` steps (:class:`aipaint.plugin.postprocess.PostStep`), parsed and checked against the
    registered post-processors (names, aliases, option names) before any model is loaded, so a
    typo costs no generation. ``allow_pickle`` (``--allow-pickle``, the user's opt-in for the run)
    reaches the steps whose post-processor takes an ``allow_pickle`` option, unless a step sets its own."""
    from aipaint.plugin.host import default_host
    from aipaint.plugin.postprocess import PostStep, check_chain

    steps = [PostStep.parse(text) for text in texts]
    resolved = check_chain(steps, default_host())
    if allow_pickle:
        steps = [PostStep(step.name, {"allow_pickle": True, **step.options}) if "allow_pickle" in spec.options else step
                 for spec, step in resolved]
    return steps


# --- running --------------------------------------------------------------------------------
def progress_bar(enabled: bool, unit: str = "step") -> tuple[ProgressCallback | None, Callable[[], None]]:
    """``(update, close)``: ``update(done, total)`` drives a progress bar on stderr, ``close()``
    removes it. When not ``enabled`` (``--no-progress``, or stderr is not a terminal), ``update``
    is None and ``close`` does nothing."""
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


def _preview_writer(path: str) -> Callable[[Any], None]:
    """The ``preview=`` callback of ``--preview FILE``: each step's cheap preview, written so
    a viewer reading the file never sees half a PNG."""
    from aipaint.api.result import check_writable, save_png

    check_writable(path, overwrite=True)  # a folder or an unwritable place: said before the model loads
    return lambda step: save_png(step.image("cheap"), path, None)


def run_and_save(args: argparse.Namespace, request: GenerationRequest) -> int:
    """The end of a generation command: ``request`` run on :func:`load_pipeline`'s pipeline (with
    ``--refiner``'s model), a progress bar and ``--preview``, then the ``--post`` chain, then the
    files, one path a line on stdout. The chain and the output path (``-o``, ``--overwrite``) are
    checked before the model loads."""
    from aipaint.api.result import output_path

    post = check_post_chain(getattr(args, "post", None) or [], args.allow_pickle)
    output_path(args.output, request.batch_size, overwrite=args.overwrite)
    callbacks: dict[str, Any] = {}
    if getattr(args, "preview", None):
        callbacks["preview"] = _preview_writer(args.preview)
    pipe = load_pipeline(args)
    if getattr(args, "refiner", None):
        request = dataclasses.replace(request, refiner=_load_refiner(args))
    progress, close = progress_bar(not args.no_progress and sys.stderr.isatty())
    callbacks["progress"] = progress
    try:
        result = pipe.generate(request, **callbacks)
        if post:
            from aipaint.engine.postprocessing import postprocess_result

            result = postprocess_result(result, post, pipe)
    finally:
        close()
    from aipaint.cli.styles import recorded

    result = recorded(args, result)
    # Without -o the free name is picked again: another run may have taken the first one meanwhile.
    output = output_path(args.output, len(result.images), overwrite=args.overwrite)
    for path in result.save_all(output, overwrite=args.overwrite):
        print(path)
    print(f"seed {result.seeds[0]}, {result.timings['total']:.2f} s", file=sys.stderr)
    return 0


# --- commands plugins add to ------------------------------------------------------------------
def command_group(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """The sub-commands of the group ``aipaint NAME …`` (``train``, ``export``), to ``add_parser``
    on: created by whichever plugin asks first, found by every later one, in any order. ``help``
    is used when it is created. A command ``NAME`` that is not a group is an :class:`AipaintError`."""
    parser = subparsers.choices.get(name)
    if parser is None:
        parser = subparsers.add_parser(name, help=help)
        group = parser.add_subparsers(dest=f"{name}_target", metavar="TARGET")
        parser.set_defaults(func=lambda args: parser.print_help() or 0, **{_GROUP: group})
    group = parser.get_default(_GROUP)
    if group is None:  # a group a plugin made with argparse's own add_subparsers
        group = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if group is None:
            raise AipaintError(f"the command {name!r} exists and is not a command group")
        parser.set_defaults(**{_GROUP: group})
    return group


def mark_generation_command(parser: argparse.ArgumentParser) -> None:
    """Declare a plugin's command a generation command: the options other plugins add to the
    generation commands (``--lora-dir``, ``--controlnet``, ``--deepcache``, …) are added to it too,
    and reach its request when it builds one with :func:`build_request` (as ``aipaint video`` does).

    Plugins add those options from their own ``register_commands``, so the command must exist by
    then: register it from a ``@hookimpl(tryfirst=True)`` ``register_commands``."""
    parser.set_defaults(**{_GENERATION_MARK: True})


def generation_parsers(subparsers: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:
    """The parsers of the generation commands that exist, each once (``txt2img`` is ``generate``'s
    alias), then those a plugin marked with :func:`mark_generation_command`: where a plugin adds
    its generation options."""
    parsers: list[argparse.ArgumentParser] = []
    marked = [parser for parser in subparsers.choices.values() if parser.get_default(_GENERATION_MARK)]
    for parser in [*(subparsers.choices.get(name) for name in GENERATION_COMMANDS), *marked]:
        if parser is not None and all(parser is not known for known in parsers):
            parsers.append(parser)
    return parsers


def add_adapter_unit_builder(parser: argparse.ArgumentParser,
                             build: Callable[[argparse.Namespace, dict[str, str]], list[AdapterUnit]]) -> None:
    """Let a plugin that added options to a generation command (e.g. ``--controlnet``) turn them into
    adapter units: ``build(args, png_params)`` returns :class:`aipaint.plugin.adapters.AdapterUnit`
    objects; ``png_params`` are the parameters recorded in ``--from-png``'s PNG (empty without it)."""
    parser.set_defaults(**{_UNIT_BUILDERS: [*(parser.get_default(_UNIT_BUILDERS) or []), build]})


def add_request_options_builder(parser: argparse.ArgumentParser,
                                build: Callable[[argparse.Namespace, dict[str, str]], dict[str, dict[str, Any]]]) -> None:
    """Let a plugin that added options to a generation command (e.g. ``--lora-dir``) pass them to its
    typed option group: ``build(args, png_params)`` returns ``{namespace: {field: value}}`` for
    :attr:`aipaint.api.request.GenerationRequest.options` (empty when its options were not given);
    ``png_params`` as for :func:`add_adapter_unit_builder`. ``--option`` given by the user wins."""
    parser.set_defaults(**{_OPTIONS_BUILDERS: [*(parser.get_default(_OPTIONS_BUILDERS) or []), build]})

