"""UNet iterations per second on an NVIDIA GPU: torch eager fp16, torch.compile, ONNX Runtime CUDA.

One iteration = one denoising step with classifier-free guidance = one UNet call at
batch 2, as in the published figures printed beside ours (all SD1.5 at 512 px, fp16):

* diffusers, eager (SDPA), H100: about 54.5 it/s
* stable-fast, H100: about 104.6 it/s

Full-size architectures with random weights (speed does not depend on the weights):
SD1.5 at 512×512 and SDXL at 1024×1024. Rows, each against torch eager in the same run:

* torch eager fp16 (SDPA) — the reference;
* torch.compile as the torch runtime does it (``nn.Module.compile``, inductor, mode
  ``reduce-overhead``: CUDA graphs), channels-last;
* ONNX Runtime with the CUDA execution provider (when ``onnxruntime-gpu`` is installed),
  on an fp16 export made with aipaint's UNet wrapper, tensors bound in place (I/O binding);
* DeepCache (interval 3) on top of the fastest torch variant, as *effective* it/s (it
  skips work, so it is listed apart from the runtimes, which compute the same thing).

    python benchmarks/gpu.py                      # both models, saves benchmarks/results/gpu.txt
    python benchmarks/gpu.py --models sd15 --iterations 100

Unverified on the CPU-only machines aipaint is developed on: run it where a GPU exists.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _runtime_bench import Report, random_sd15_unet, random_sdxl_unet

ANCHORS = {"sd15": [("diffusers eager (published, H100)", 54.5), ("stable-fast (published, H100)", 104.6)], "sdxl": []}
MODELS = {"sd15": (random_sd15_unet, 512, 768, {}), "sdxl": (random_sdxl_unet, 1024, 2048, {"text_embeds": 1280, "time_ids": 6})}


def its(fn: Callable[[], Any], iterations: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(iterations):
        fn()
    torch.cuda.synchronize()
    return iterations / (time.perf_counter() - started)


def inputs(size: int, hidden: int, extras: dict[str, int]) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    latent = size // 8
    out = {
        "sample": torch.randn(2, 4, latent, latent, generator=g, device="cuda", dtype=torch.float16),
        "timestep": torch.full((2,), 500.0, device="cuda"),
        "encoder_hidden_states": torch.randn(2, 77, hidden, generator=g, device="cuda", dtype=torch.float16),
    }
    for name, width in extras.items():
        out[name] = torch.randn(2, width, generator=g, device="cuda", dtype=torch.float16)
    if "time_ids" in out:
        out["time_ids"] = torch.tensor([[size, size, 0, 0, size, size]] * 2, device="cuda", dtype=torch.float16)
    return out


def torch_call(unet: torch.nn.Module, feed: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    extras = {k: v for k, v in feed.items() if k in ("text_embeds", "time_ids")}
    kwargs = {"added_cond_kwargs": extras} if extras else {}

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return unet(feed["sample"], feed["timestep"], encoder_hidden_states=feed["encoder_hidden_states"],
                        return_dict=False, **kwargs)[0]

    return call


def ort_cuda_call(unet: torch.nn.Module, feed: dict[str, torch.Tensor], work: Path) -> Callable[[], torch.Tensor] | str:
    """An ONNX Runtime CUDA session on aipaint's UNet wrapper, or why there is none."""
    import numpy as np
    import onnxruntime as ort
    from aipaint_plugins.onnx_runtime.export import _wrappers

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime-gpu is not installed (CUDAExecutionProvider missing)"
    extras = [k for k in feed if k in ("text_embeds", "time_ids")]
    wrapper = _wrappers()["unet"](unet, extras, 0)
    names = list(feed)
    path = work / "unet.onnx"
    axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
            "encoder_hidden_states": {0: "batch", 1: "sequence"}, "out_sample": {0: "batch", 2: "height", 3: "width"}}
    axes.update({k: {0: "batch"} for k in extras})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(feed[n] for n in names), str(path), input_names=names, output_names=["out_sample"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    stream = torch.cuda.current_stream().cuda_stream
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=[("CUDAExecutionProvider", {
        "device_id": 0, "user_compute_stream": str(stream), "cudnn_conv_algo_search": "HEURISTIC",
        "enable_cuda_graph": False}), "CPUExecutionProvider"])
    out = torch.empty_like(feed["sample"][:, :4])
    binding = session.io_binding()
    for name in names:
        value = feed[name].contiguous()
        binding.bind_input(name, "cuda", 0, np.float16 if value.dtype == torch.float16 else np.float32,
                           tuple(value.shape), value.data_ptr())
    binding.bind_output("out_sample", "cuda", 0, np.float16, tuple(out.shape), out.data_ptr())

    def call() -> torch.Tensor:
        session.run_with_iobinding(binding)
        return out

    return call


def bench(report: Report, model: str, iterations: int, warmup: int, skip_compile: bool, skip_ort: bool) -> None:
    from aipaint_plugins.deepcache import DeepCacheSettings, DeepCacheUNet

    factory, size, hidden, extras = MODELS[model]
    report(f"## {model.upper()} UNet at {size}×{size} (batch 2 = one CFG step), fp16, {torch.cuda.get_device_name()}")
    unet = factory().half().cuda()
    feed = inputs(size, hidden, extras)
    rows: list[tuple[str, float | None, str]] = []
    eager = its(torch_call(unet, feed), iterations, warmup)
    rows.append(("torch eager fp16 (SDPA) — reference", eager, ""))
    fastest_torch = eager
    if not skip_ort:
        with tempfile.TemporaryDirectory() as tmp:
            call = ort_cuda_call(unet, feed, Path(tmp))
            if isinstance(call, str):
                rows.append(("ONNX Runtime CUDA", None, call))
            else:
                reference = torch_call(unet, feed)()
                error = float((call() - reference).abs().max() / reference.abs().max())
                rows.append(("ONNX Runtime CUDA fp16 (I/O binding)", its(call, iterations, warmup), f"rel. error {error:.1e}"))
                del call
                gc.collect()
    if not skip_compile:
        unet = unet.to(memory_format=torch.channels_last)
        unet.compile(mode="reduce-overhead")
        started = time.perf_counter()
        compiled = torch_call(unet, feed)
        compiled()
        compile_s = time.perf_counter() - started
        speed = its(compiled, iterations, warmup)
        fastest_torch = max(fastest_torch, speed)
        rows.append(("torch.compile (inductor, reduce-overhead, channels-last)", speed, f"compile {compile_s:.0f} s"))
        unet._compiled_call_impl = None
    wrapper = DeepCacheUNet(unet, DeepCacheSettings(interval=3, branch=0))
    rows.append(("torch eager + DeepCache interval 3 (effective, skips work)", its(torch_call(unet, feed), iterations, warmup), ""))
    wrapper.restore()
    report("")
    report("| runtime | it/s | vs eager | note |")
    report("|---|---|---|---|")
    for name, speed, note in rows:
        report(f"| {name} | {speed:.1f} | {speed / eager:.2f}× | {note} |" if speed else f"| {name} | — | — | {note} |")
    for name, value in ANCHORS[model]:
        report(f"| {name} | {value:.1f} | — | published anchor, not measured here |")
    best = max((s for _, s, _ in rows[:-1] if s), default=eager)
    if ANCHORS[model]:
        anchor = max(v for _, v in ANCHORS[model])
        report(f"\nfastest runtime: {best:.1f} it/s = {best / anchor:.2f}× the best anchor ({anchor} it/s)")
    report("")
    del unet, feed
    gc.collect()
    torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--skip-ort", action="store_true")
    parser.add_argument("--save", default="gpu.txt", help="file name under benchmarks/results ('' to not save)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs an NVIDIA GPU with CUDA; torch sees none here, so nothing was measured.", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    report = Report()
    report("# UNet iterations per second on the GPU")
    report(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, "
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    report("")
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        bench(report, model, args.iterations, args.warmup, args.skip_compile, args.skip_ort)
    if args.save:
        print(f"saved {report.save(args.save)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
