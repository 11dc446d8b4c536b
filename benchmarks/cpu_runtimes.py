"""CPU runtimes side by side: torch fp32/bf16, ONNX Runtime fp32/int8, OpenVINO fp32/bf16/int8 weights/int8 activations.

Three sections, each run in one process with the sides timed in turns (a, b, c, a, b, c, …)
so that load from other processes on a shared machine falls on every side alike:

1. ``unet``: one UNet call (batch 2 = one step with classifier-free guidance) of a full-size
   SD1.5 architecture with random weights, at 256 px by default. Sides run in groups that fit
   in memory, and torch fp32 is in every group as the anchor (its time in each group shows
   how the load drifted). Error: max |side - torch fp32| / max |torch fp32| on the same inputs.
2. ``image``: whole txt2img on the same model (prompt encoding, every step, VAE decoding),
   seconds per image, and the image's PSNR against torch fp32's.
3. ``embedded``: the embedded model (32 px): seconds per image and adherence
   (``aipaint_plugins.shapes_world.evaluate.adherence``, mean score × 100 over N captions)
   for every side.

``torch-fp32`` is plain torch eager, the model unprepared (aipaint's default before the torch
runtime prepacked weights); ``torch-prepack`` is the torch runtime's default for an SD-sized fp32
model on the CPU since then: eager, with the convolution and linear weights laid out once for
oneDNN (``prepack``, :mod:`aipaint_plugins.torch_runtime.prepack`).

``torch-compile`` is the torch runtime with ``compile=true`` on the UNet and the VAE decoder
(``--runtime-option compile=true --runtime-option compile_components=unet,vae``): inductor,
fp32. Its first call compiles (a minute or more; the untimed round).

``ov-int8a`` is OpenVINO with the UNet's convolutions in int8, weights and activations
(``aipaint export openvino --activations int8``; everything else fp32), and ``ov-int8wa`` the
same with int8 weights everywhere (``--weights int8 --activations int8``: optimum-intel's hybrid
recipe); both calibrated by
generating 4 ordinary prompts × 20 steps (``--calibration-prompts``, ``--calibration-steps``) with the
model at the section's size (on the embedded model: 8 training-style captions that are not among
the evaluated ones, 20 steps).

bf16 sides compute in bf16 only where the CPU has bf16 units; elsewhere torch emulates bf16
(slower than fp32: the time is not what a bf16 CPU gives, the error is) and OpenVINO falls back
to fp32 (the side is then skipped and said so).

The references, in the image section: ``optimum-default`` and ``optimum-f32`` are optimum-intel's
own ``OVStableDiffusionPipeline`` (static shapes) at its default precision and at forced f32, run
by ``benchmarks/optimum_reference.py`` in its own virtual environment as a separate process that
makes one image per request, so it is timed in turns with aipaint's sides from the same initial
noise. Build that environment once:

    python benchmarks/optimum_reference.py --setup .optimum-venv
    python benchmarks/cpu_runtimes.py --sections unet --threads 2
    python benchmarks/cpu_runtimes.py --sections image --sides torch-fp32,ov-fp32,optimum-default,optimum-f32
    python benchmarks/cpu_runtimes.py --sections embedded --captions 40
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _runtime_bench import Report, environment, random_sd15_model, relative_error

SIDES = ("torch-fp32", "torch-prepack", "torch-bf16", "torch-compile", "ort-fp32", "ort-int8", "ov-fp32", "ov-bf16",
         "ov-int8", "ov-int8a", "ov-int8wa", "optimum-default", "optimum-f32")
REFERENCE_SIDES = ("optimum-default", "optimum-f32")  # the image section only
REFERENCE_PYTHON = Path(__file__).resolve().parent.parent / ".optimum-venv" / "bin" / "python"
PROMPT = "a lighthouse on a cliff at sunset, oil painting"


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def in_turns(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Every call's wall times, ``repeats`` rounds in turns (after one untimed round)."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return times


def first_round(report: Report, calls: dict[str, Callable[[], Any]], score: Callable[[Any], float],
                what: str) -> dict[str, float]:
    """Every call once, scored; its time (compilation, packing or export included) reported."""
    scores, first = {}, {}
    for name, call in calls.items():
        started = time.perf_counter()
        scores[name] = score(call())
        first[name] = time.perf_counter() - started
    report(f"(first {what}, with any compilation: {', '.join(f'{k} {v:.1f} s' for k, v in first.items())})")
    return scores


SAVE_AS = ""


def checkpoint(report: Report) -> None:
    """Save what was measured so far (a long run cut short keeps its finished groups)."""
    if SAVE_AS:
        report.save(SAVE_AS)


class Exports:
    """The ONNX export and OpenVINO conversions of one model, made on first use."""

    def __init__(self, model: Any, work: Path, components: tuple[str, ...], report: Report,
                 calibration: Any = None) -> None:
        self.model, self.work, self.components, self.report = model, work, components, report
        self.calibration = calibration  # for ov-int8a: a Calibration whose model is ``model``
        self.folders: dict[str, Path] = {}
        work.mkdir(parents=True, exist_ok=True)

    def onnx(self) -> Path:
        if "onnx" not in self.folders:
            from aipaint_plugins.onnx_runtime.export import export_onnx

            started = time.perf_counter()
            self.folders["onnx"] = export_onnx(self.model, self.work / "onnx", components=self.components).root
            self.report(f"(ONNX export of {', '.join(self.components)}: {time.perf_counter() - started:.0f} s)")
        return self.folders["onnx"]

    def onnx_int8(self) -> Path:
        if "onnx-int8" not in self.folders:
            from aipaint_plugins.onnx_runtime.export import export_onnx

            started = time.perf_counter()
            self.folders["onnx-int8"] = export_onnx(self.model, self.work / "onnx-int8", components=self.components,
                                                    int8=True).root
            self.report(f"(ONNX export with int8 UNet MatMul weights: {time.perf_counter() - started:.0f} s)")
        return self.folders["onnx-int8"]

    def openvino(self, weights: str, activations: str = "float") -> Path:
        key = f"ov-{weights}" + ("-int8a" if activations == "int8" else "")
        if key not in self.folders:
            from aipaint_plugins.openvino_runtime.convert import convert_to_openvino

            started = time.perf_counter()
            calibration = self.calibration if activations == "int8" else None
            self.folders[key] = convert_to_openvino(self.onnx(), self.work / key, weights=weights,
                                                    activations=activations, calibration=calibration).root
            detail = (f", int8 convolutions (weights and activations) calibrated on {len(calibration.prompts)} "
                      f"prompts × {calibration.steps} steps" if calibration else "")
            self.report(f"(OpenVINO IR, {weights} weights{detail}: {time.perf_counter() - started:.0f} s)")
        return self.folders[key]

    def openvino_side(self, side: str) -> Path:
        return self.openvino("int8" if side in ("ov-int8", "ov-int8wa") else "fp32",
                             "int8" if side in ("ov-int8a", "ov-int8wa") else "float")


CALIBRATION = {"prompts": 4, "steps": 20}  # --calibration-prompts, --calibration-steps


def calibration_for(model: Any, size: int | None, steps: int | None = None, prompts: Any = None) -> Any:
    """ov-int8a's calibration: ``model`` generating ``--calibration-prompts`` ordinary prompts (or ``prompts``) at
    the benchmark's size (``None``: the model's default size), ``--calibration-steps`` steps each."""
    from aipaint_plugins.openvino_runtime.quantize import DEFAULT_PROMPTS, Calibration

    return Calibration(model, list(prompts or DEFAULT_PROMPTS[:CALIBRATION["prompts"]]),
                       steps=steps or CALIBRATION["steps"], width=size, height=size)


def prepare_side(side: str, reference: Any, exports: Exports, threads: int) -> Any | None:
    """A copy of ``reference`` prepared for ``side``, or ``None`` when the side cannot run here."""
    from aipaint_plugins.torch_runtime import prepare_torch

    model = copy.deepcopy(reference)
    if side == "torch-prepack":  # what the torch runtime does by default for an SD-sized fp32 model on the CPU
        prepare_torch(model, {"precision": "fp32", "prepack": True})
    elif side == "torch-compile":  # fp32, UNet and VAE decoder through inductor
        prepare_torch(model, {"precision": "fp32", "compile": True, "compile_components": ["unet", "vae"]})
    elif side.startswith("torch"):
        prepare_torch(model, {"precision": side.split("-")[1]})
    elif side.startswith("ort-"):
        from aipaint_plugins.onnx_runtime.runtime import prepare_onnxruntime

        folder = exports.onnx_int8() if side == "ort-int8" else exports.onnx()
        prepare_onnxruntime(model, {"onnx_dir": str(folder), "threads": threads, "verify": "size"})
    elif side.startswith("ov-"):
        import openvino as ov
        from aipaint_plugins.openvino_runtime.runtime import OvOptions, planned_precision, prepare_openvino

        precision = "bf16" if side == "ov-bf16" else "auto"
        if side == "ov-bf16" and planned_precision(ov.Core(), OvOptions.parse({"openvino_dir": "-", "precision": "bf16"})) != "bf16":
            return None
        folder = exports.openvino_side(side)
        prepare_openvino(model, {"openvino_dir": str(folder), "threads": threads, "verify": "size", "precision": precision})
    return model


def unet_section(report: Report, sides: list[str], work: Path, latent: int, repeats: int, threads: int,
                 group_size: int) -> None:
    report(f"## 1. One UNet call, full-size SD1.5 (random weights), batch 2, {latent * 8} px, {threads} thread(s)")
    started = time.perf_counter()
    reference = random_sd15_model()
    report(f"(model built in {time.perf_counter() - started:.0f} s; load average before: {load_average()})")
    exports = Exports(reference, work, ("unet",), report,
                      calibration_for(reference, latent * 8))
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, latent, latent, generator=g)
    embeds = torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([500.0, 500.0])

    def caller(model: Any) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with torch.inference_mode():
                return model.unet_call(sample, t, embeds)
        return call

    anchor = caller(reference)
    expected = anchor()
    others = [s for s in sides if s != "torch-fp32"]
    rows = []
    for index in range(0, len(others), group_size):
        group = others[index:index + group_size]
        models = {}
        for side in group:
            model = prepare_side(side, reference, exports, threads)
            if model is None:
                report(f"{side}: skipped, this CPU has no bf16 units (OpenVINO would run fp32)")
            else:
                models[side] = model
        calls = {"torch-fp32": anchor, **{side: caller(model) for side, model in models.items()}}
        errors = first_round(report, calls, lambda out: relative_error(expected, out), "call")
        times = in_turns(calls, repeats)
        load = load_average()
        for side in calls:
            rows.append((f"group {index // group_size + 1}", side, times[side], errors[side], load))
        del models, calls
        gc.collect()
        report(f"(group {index // group_size + 1} done: {', '.join(f'{k} {statistics.median(v):.2f} s' for k, v in times.items())})")
        checkpoint(report)
    report("")
    report(f"| group | side | s / UNet call (median of {repeats}) | all | vs torch fp32 in the group | max rel. error | load avg after |")
    report("|---|---|---|---|---|---|---|")
    anchors = {group: statistics.median(times) for group, side, times, _, _ in rows if side == "torch-fp32"}
    for group, side, times, error, load in rows:
        median = statistics.median(times)
        report(f"| {group} | {side} | {median:.2f} | {', '.join(f'{x:.2f}' for x in times)} | "
               f"{anchors[group] / median:.2f}× | {error:.1e} | {load} |")
    report("")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


class OptimumSide:
    """optimum-intel's pipeline in its own environment (benchmarks/optimum_reference.py ``serve``):
    calling it makes one image from ``noise`` and returns it as a uint8 array."""

    def __init__(self, python: Path, folder: Path, work: Path, precision: str, threads: int, size: int, steps: int,
                 noise: Path, report: Report) -> None:
        script = Path(__file__).resolve().parent / "optimum_reference.py"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        command = [str(python), str(script), "serve", "--model", str(folder), "--work", str(work),
                   "--precision", precision, "--threads", str(threads), "--size", str(size), "--steps", str(steps),
                   "--cfg", "7", "--prompt", PROMPT]
        started = time.perf_counter()
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.noise, self.out = noise, work / f"image-{precision}.npy"
        info = self._reply()
        report(f"(optimum-intel {info.get('optimum_intel')}, OpenVINO {info.get('openvino')}, diffusers "
               f"{info.get('diffusers')}, transformers {info.get('transformers')}: precision {precision} → UNet "
               f"inference precision {info.get('unet_precision')}; export {info.get('export_seconds', 'reused')} s, "
               f"load + reshape + compile {info.get('load_seconds')} s; ready after {time.perf_counter() - started:.0f} s)")

    def _reply(self) -> dict:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"the optimum-intel reference stopped (exit code {self.process.wait()}); see its stderr")

    def __call__(self) -> np.ndarray:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"latents": str(self.noise), "out": str(self.out)}) + "\n")
        self.process.stdin.flush()
        self._reply()
        return np.load(self.out)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=120)


def save_diffusers_folder(model: Any, folder: Path) -> Path:
    """``model`` (an SD1.5 LatentDiffusionModel) as a diffusers folder with an Euler scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    if not (folder / "model_index.json").is_file():
        StableDiffusionPipeline(unet=model.unet, vae=model.vae, text_encoder=model.text_encoder,
                                tokenizer=model.tokenizer,
                                scheduler=EulerDiscreteScheduler.from_config(model.scheduler_config),
                                safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(folder)
    return folder


def image_section(report: Report, sides: list[str], work: Path, size: int, steps: int, repeats: int, threads: int,
                  group_size: int, reference_python: Path = REFERENCE_PYTHON) -> None:
    from aipaint.pipeline import Pipeline
    from aipaint.plugin.host import default_host

    report(f"## 2. Whole txt2img, full-size SD1.5 (random weights), {size} px, {steps} steps, Euler, CFG 7, "
           f"{threads} thread(s)")
    host = default_host()
    reference = random_sd15_model()
    exports = Exports(reference, work, ("unet", "text_encoder", "vae_decoder", "vae_encoder"), report,
                      calibration_for(reference, size))
    params = dict(seed=5, steps=steps, width=size, height=size, sampler="Euler", cfg_scale=7.0)
    noise = work / "noise.npy"
    work.mkdir(parents=True, exist_ok=True)
    latent = size // 2 ** (len(reference.vae.config.block_out_channels) - 1)
    shape = (1, reference.unet.config.in_channels, latent, latent)  # aipaint's noise for the seed, handed to the reference
    np.save(noise, torch.randn(shape, generator=torch.Generator().manual_seed(params["seed"])).numpy())
    if any(side in REFERENCE_SIDES for side in sides):
        if not reference_python.is_file():
            raise SystemExit(f"no optimum-intel environment at {reference_python}: build it with "
                             "`python benchmarks/optimum_reference.py --setup .optimum-venv` or pass --reference-python")
        save_diffusers_folder(reference, work / "sd15-random")

    def aipaint_side(pipe: Pipeline) -> Callable[[], np.ndarray]:
        return lambda: np.asarray(pipe.txt2img(PROMPT, **params).images[0])

    anchor = aipaint_side(Pipeline(reference, host))
    expected = anchor()
    others = [s for s in sides if s != "torch-fp32"]
    rows = []
    for index in range(0, len(others), group_size):
        calls: dict[str, Callable[[], np.ndarray]] = {"torch-fp32": anchor}
        for side in others[index:index + group_size]:
            if side in REFERENCE_SIDES:
                calls[side] = OptimumSide(reference_python, work / "sd15-random", work / "optimum",
                                          side.split("-")[1], threads, size, steps, noise, report)
                continue
            model = prepare_side(side, reference, exports, threads)
            if model is not None:
                calls[side] = aipaint_side(Pipeline(model, host))
        quality = first_round(report, calls, lambda out: psnr(expected, out), "image")
        times = in_turns(calls, repeats)
        for side in calls:
            rows.append((f"group {index // group_size + 1}", side, times[side], quality[side], load_average()))
        for call in calls.values():
            if isinstance(call, OptimumSide):
                call.close()
        del calls
        gc.collect()
        report(f"(group {index // group_size + 1} done)")
        checkpoint(report)
    report("")
    report(f"| group | side | s / image (median of {repeats}) | all | vs torch fp32 in the group | PSNR vs torch fp32 (dB) | load avg |")
    report("|---|---|---|---|---|---|---|")
    anchors = {group: statistics.median(times) for group, side, times, _, _ in rows if side == "torch-fp32"}
    for group, side, times, quality, load in rows:
        median = statistics.median(times)
        report(f"| {group} | {side} | {median:.1f} | {', '.join(f'{x:.1f}' for x in times)} | {anchors[group] / median:.2f}× | "
               f"{quality:.1f} | {load} |")
    report("")


def embedded_section(report: Report, sides: list[str], work: Path, captions: int, threads: int) -> None:
    from aipaint_plugins.shapes_world.evaluate import adherence
    from aipaint_plugins.shapes_world.scene import random_scene

    import aipaint
    from aipaint.models import zoo

    report(f"## 3. Embedded model ({zoo.DEFAULT_MODEL}, 32 px, its default steps and sampler), {captions} captions, "
           f"{threads} thread(s)")
    rng = np.random.default_rng(0)
    texts = [random_scene(rng, "train").caption for _ in range(captions)]
    base = aipaint.load(zoo.DEFAULT_MODEL)
    calibration_rng = np.random.default_rng(1)  # calibration captions: not the evaluated ones
    calibration = calibration_for(base.model, None, 20,
                                  [random_scene(calibration_rng, "train").caption for _ in range(8)])
    exports = Exports(base.model, work / "embedded", ("unet", "text_encoder", "vae_decoder", "vae_encoder"), report,
                      calibration)
    pipes = {}
    for side in sides:
        if side == "torch-fp32":
            pipes[side] = base
            continue
        options: dict[str, Any] = {}
        runtime = "torch"
        if side == "torch-bf16":
            options = {"precision": "bf16"}
        elif side.startswith("ort-"):
            folder = exports.onnx_int8() if side == "ort-int8" else exports.onnx()
            runtime, options = "onnxruntime", {"onnx_dir": str(folder), "threads": threads}
        elif side.startswith("ov-"):
            import openvino as ov
            from aipaint_plugins.openvino_runtime.runtime import OvOptions, planned_precision

            if side == "ov-bf16" and planned_precision(ov.Core(), OvOptions.parse({"openvino_dir": "-", "precision": "bf16"})) != "bf16":
                report(f"{side}: skipped, this CPU has no bf16 units")
                continue
            folder = exports.openvino_side(side)
            runtime = "openvino"
            options = {"openvino_dir": str(folder), "threads": threads, "precision": "bf16" if side == "ov-bf16" else "auto"}
        pipes[side] = aipaint.load(zoo.DEFAULT_MODEL, runtime=runtime, runtime_options=options)
    scores: dict[str, list[float]] = {side: [] for side in pipes}
    times: dict[str, list[float]] = {side: [] for side in pipes}
    for pipe in pipes.values():
        pipe.txt2img(texts[0], seed=0)  # warm-up (and OpenVINO's compile for this shape)
    for i, text in enumerate(texts):
        for side, pipe in pipes.items():  # in turns, caption by caption
            started = time.perf_counter()
            image = pipe.txt2img(text, seed=1000 + i).images[0]
            times[side].append(time.perf_counter() - started)
            scores[side].append(adherence(image, text).score * 100)
    report("")
    report(f"| side | s / image (median of {captions}) | adherence (mean × 100) | vs torch fp32 (points) |")
    report("|---|---|---|---|")
    reference = float(np.mean(scores["torch-fp32"])) if "torch-fp32" in scores else float("nan")
    for side in pipes:
        mean = float(np.mean(scores[side]))
        report(f"| {side} | {statistics.median(times[side]):.3f} | {mean:.1f} | {mean - reference:+.1f} |")
    report(f"(load average after: {load_average()})")
    report("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="unet,image,embedded")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, from {', '.join(SIDES)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latent", type=int, default=32, help="UNet section: latent side (32 = 256 px)")
    parser.add_argument("--size", type=int, default=256, help="image section: image side")
    parser.add_argument("--steps", type=int, default=20, help="image section: steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=2, help="sides besides torch fp32 held in memory at once")
    parser.add_argument("--captions", type=int, default=40, help="embedded section: captions (images per side)")
    parser.add_argument("--calibration-prompts", type=int, default=4, help="ov-int8a: prompts calibrated on (full size)")
    parser.add_argument("--calibration-steps", type=int, default=20, help="ov-int8a: steps per calibration prompt")
    parser.add_argument("--save", default="cpu_runtimes.txt", help="file under benchmarks/results ('' to not save)")
    parser.add_argument("--reference-python", type=Path, default=REFERENCE_PYTHON,
                        help="the optimum-intel environment's python (benchmarks/optimum_reference.py --setup)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    global SAVE_AS
    SAVE_AS = args.save
    CALIBRATION.update(prompts=args.calibration_prompts, steps=args.calibration_steps)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        parser.error(f"unknown sides {unknown}; choose from {', '.join(SIDES)}")
    from aipaint_plugins.torch_runtime.precision import cpu_features

    report = Report()
    report("# CPU runtimes: torch, ONNX Runtime, OpenVINO")
    report(f"command: python benchmarks/cpu_runtimes.py --sections {args.sections} --sides {','.join(sides)} "
           f"--threads {args.threads} --repeats {args.repeats} --latent {args.latent} --size {args.size} "
           f"--steps {args.steps} --group-size {args.group_size} --captions {args.captions} "
           f"--calibration-prompts {args.calibration_prompts} --calibration-steps {args.calibration_steps}")
    report(environment())
    report(f"CPU: {cpu_features().describe()}; {os.cpu_count()} logical CPUs shared with other work; "
           f"load average at start: {load_average()}")
    report("")
    with tempfile.TemporaryDirectory(prefix="aipaint-cpu-") as tmp:
        work = Path(tmp)
        for section in [s.strip() for s in args.sections.split(",")]:
            if section == "unet":
                unet_section(report, [s for s in sides if s not in REFERENCE_SIDES], work / "unet", args.latent, args.repeats, args.threads, args.group_size)
            elif section == "image":
                image_section(report, sides, work / "image", args.size, args.steps, args.repeats, args.threads,
                              args.group_size, args.reference_python)
            elif section == "embedded":
                embedded_section(report, [s for s in sides if s not in REFERENCE_SIDES], work, args.captions, args.threads)
            else:
                parser.error(f"unknown section {section!r}")
            checkpoint(report)
    if args.save:
        print(f"saved {report.save(args.save)}")


if __name__ == "__main__":
    main()
