"""Shared helpers of the runtime and speed-feature benchmarks (onnx_vs_torch.py, speed_features.py, gpu.py).

Full-size architectures get random weights (nothing is downloaded): the parameters are
created on the meta device and filled with small normal noise, which is much faster
than the default per-layer initialisers and gives activations of a realistic scale.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


class Report:
    """Prints lines and keeps them, so a run's table can be saved under benchmarks/results/."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def save(self, name: str) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / name
        path.write_text("\n".join(self.lines) + "\n")
        return path


def environment() -> str:
    import platform

    import onnxruntime

    return (f"python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"onnxruntime {onnxruntime.__version__}, {platform.processor() or platform.machine()}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def random_init(module: torch.nn.Module, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Small random weights without the default (slow, per-layer) initialisers. The module was
    built with its parameters on the meta device (``init_empty_weights``); buffers are real.
    Floating-point parameters are all made ``dtype``: a config's own dtype (SDXL's text encoder 2
    says float16) would otherwise leave some layers in half precision beside float32 ones."""
    generator = torch.Generator().manual_seed(seed)
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            tensor = torch.empty(param.shape, dtype=dtype if param.dtype.is_floating_point else param.dtype)
            if name == "weight" and "norm" in type(sub).__name__.lower():
                tensor.fill_(1.0)
            elif name == "bias":
                tensor.zero_()
            else:
                tensor.normal_(0.0, 0.02, generator=generator)
            sub._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
    return module.eval()


def build(factory: Callable[[], torch.nn.Module], seed: int = 0) -> torch.nn.Module:
    """``factory()`` built on the meta device, then given :func:`random_init` weights."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = factory()
    return random_init(module, seed)


def random_sd15_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    config = ROOT / "zoo" / "configs" / "sd15" / "unet"
    return build(lambda: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config)))


def random_sdxl_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    config = ROOT / "zoo" / "configs" / "sdxl-base" / "unet"
    return build(lambda: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config)))


def random_sd15_model(name: str = "sd15-random") -> Any:
    """A full-size SD1.5 LatentDiffusionModel (UNet 860M, CLIP ViT-L text encoder, VAE) with random weights."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from aipaint.models.latent import LatentDiffusionModel

    config = ROOT / "zoo" / "configs" / "sd15"
    return LatentDiffusionModel(
        family="sd15",
        name=name,
        unet=random_sd15_unet(),
        vae=build(lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae")), 1),
        text_encoder=build(lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder")), 2),
        tokenizer=CLIPTokenizer.from_pretrained(config / "tokenizer"),
        scheduler_config=json.loads((config / "scheduler" / "scheduler_config.json").read_text()),
    )


def tiny_model_folder(folder: Path) -> Path:
    """The test suite's tiny random SD1.5 (tests/conftest.py), saved once."""
    if not (folder / "model_index.json").is_file():
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import save_tiny_sd

        save_tiny_sd(folder)
    return folder


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None) -> float:
    """Median wall time of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def alternating_medians(calls: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each call, timed in turns (a, b, a, b, …) so that load from other
    processes on a shared machine falls on every candidate alike."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max |other - reference| / max |reference|: the error on the output's own scale."""
    reference, other = reference.float(), other.float()
    return float((other - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
