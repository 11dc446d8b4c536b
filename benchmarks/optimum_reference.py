"""optimum-intel's own OpenVINO Stable Diffusion pipeline, as the reference that CPU users pick.

Runs in its **own virtual environment** (optimum-intel pins an older transformers and hub client
than aipaint's), as a separate process that ``cpu_runtimes.py`` drives one image at a time, so the
reference and aipaint's sides are timed in turns:

    python benchmarks/optimum_reference.py --setup /work/optenv     # once: the reference environment
    /work/optenv/bin/python benchmarks/optimum_reference.py serve --model DIR --work DIR --precision default

``serve`` exports the diffusers folder ``--model`` to OpenVINO IR with optimum-intel (once per
``--work`` folder), loads it with ``OVStableDiffusionPipeline`` at static shapes for the request
size (``reshape`` + ``compile``, as optimum-intel's docs advise for speed), then answers on stdout,
one JSON line per request read from stdin:

    {"latents": "noise.npy", "out": "image.npy"}  →  {"seconds": 8.1}

``--precision default`` leaves OpenVINO's inference precision to the CPU (bf16 on CPUs with
AMX/AVX512_BF16, f32 elsewhere); ``f32`` forces ``INFERENCE_PRECISION_HINT=f32``. The scheduler
is Euler (diffusers' ``EulerDiscreteScheduler`` from the model's config), as aipaint's side uses;
the initial noise comes from the caller, so both sides start from the same latents.

transformers 5.24+ saves ``CLIPTextModel`` weights without the ``text_model.`` prefix, which the
reference environment's transformers 5.5 expects: the folder is copied with the keys rewritten.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REFERENCE_PACKAGES = ["torch==2.14.1", "optimum-intel[openvino]==2.2.0", "diffusers==0.39.0"]


def setup(venv: Path) -> None:
    """Create the reference environment (torch first, pinned, so nothing pulls another build)."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, REFERENCE_PACKAGES[0]], check=True)
    subprocess.run([*pip, *REFERENCE_PACKAGES], check=True)


def with_prefixed_text_encoder(model: Path, work: Path) -> Path:
    """A copy of the diffusers folder ``model`` whose text encoder keys carry ``text_model.``."""
    from safetensors.torch import load_file, save_file

    target = work / "model"
    if (target / "model_index.json").is_file():
        return target
    shutil.copytree(model, target, dirs_exist_ok=True)
    for path in (target / "text_encoder").glob("*.safetensors"):
        state = load_file(str(path))
        if any(not k.startswith("text_model.") for k in state):
            state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
            save_file(state, str(path), metadata={"format": "pt"})
    return target


def load_pipeline(model: Path, work: Path, precision: str, threads: int, size: int) -> tuple[object, dict]:
    from diffusers import EulerDiscreteScheduler
    from optimum.intel import OVStableDiffusionPipeline

    info: dict = {}
    exported = work / "openvino"
    if not (exported / "model_index.json").is_file():
        started = time.perf_counter()
        pipe = OVStableDiffusionPipeline.from_pretrained(with_prefixed_text_encoder(model, work), export=True,
                                                         compile=False)
        pipe.save_pretrained(exported)
        info["export_seconds"] = round(time.perf_counter() - started, 1)
        del pipe
    config: dict = {"INFERENCE_NUM_THREADS": str(threads)}
    if precision == "f32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    started = time.perf_counter()
    pipe = OVStableDiffusionPipeline.from_pretrained(exported, compile=False, ov_config=config)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
    pipe.compile()
    info["load_seconds"] = round(time.perf_counter() - started, 1)
    try:  # pipe.unet.request is the compiled model once compile() ran
        info["unet_precision"] = str(pipe.unet.request.get_property("INFERENCE_PRECISION_HINT"))
    except Exception as exc:  # the property is informative only
        info["unet_precision"] = f"unknown ({type(exc).__name__})"
    return pipe, info


def serve(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pipe, info = load_pipeline(Path(args.model), work, args.precision, args.threads, args.size)
    import diffusers
    import openvino
    import optimum.intel.version as oiv
    import transformers

    info.update(ready=True, optimum_intel=oiv.__version__, openvino=openvino.__version__,
                diffusers=diffusers.__version__, transformers=transformers.__version__)
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        latents = torch.from_numpy(np.load(request["latents"]))
        started = time.perf_counter()
        image = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.cfg, latents=latents,
                     height=args.size, width=args.size, output_type="np").images[0]
        seconds = time.perf_counter() - started
        np.save(request["out"], (np.clip(image, 0, 1) * 255).round().astype(np.uint8))
        print(json.dumps({"seconds": seconds}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", metavar="VENV", help="create the reference environment at VENV and exit")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("serve", help="serve images of one model, one JSON line per request")
    run.add_argument("--model", required=True, help="a diffusers Stable Diffusion folder")
    run.add_argument("--work", required=True, help="where the OpenVINO export is kept")
    run.add_argument("--precision", choices=("default", "f32"), default="default")
    run.add_argument("--threads", type=int, default=2)
    run.add_argument("--size", type=int, default=256)
    run.add_argument("--steps", type=int, default=20)
    run.add_argument("--cfg", type=float, default=7.0)
    run.add_argument("--prompt", default="a lighthouse on a cliff at sunset, oil painting")
    args = parser.parse_args()
    if args.setup:
        setup(Path(args.setup))
    elif args.command == "serve":
        serve(args)
    else:
        parser.error("give --setup VENV or the serve command")


if __name__ == "__main__":
    main()
