"""ONNX Runtime (CPU) against torch eager (CPU), each figure against its reference in the same run.

1. Full-size SD1.5 UNet (random weights), exported with ``aipaint export``'s code path:
   time per UNet call (= per step with classifier-free guidance: batch 2) at small
   latents (32×32 = 256 px images by default), the ratio, and the error of ONNX Runtime
   relative to torch (max |Δ| / max |torch output|; aim ≤ 1e-3 in fp32).
2. Whole txt2img (prompt encoding, every step, VAE decoding) on the tiny test model and
   on the embedded model (when it is installed): time per image for both runtimes and
   the largest pixel difference.

    python benchmarks/onnx_vs_torch.py                       # all, 1 thread, saves benchmarks/results/onnx_vs_torch.txt
    python benchmarks/onnx_vs_torch.py --threads 2 --latent 64 --skip-pipelines

The full-size part needs about 10 GB of free memory and 3.5 GB of disk (the export), and
runs for a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _runtime_bench import (
    Report,
    alternating_medians,
    environment,
    random_sd15_model,
    relative_error,
    tiny_model_folder,
)

PROMPT = "a big red circle on the left, on a white background"


def full_size_unet(report: Report, work: Path, latent: int, batch: int, repeats: int, threads: int) -> None:
    from aipaint_plugins.onnx_runtime.export import export_onnx
    from aipaint_plugins.onnx_runtime.runtime import prepare_onnxruntime

    report(f"## 1. SD1.5 UNet, full size (random weights), batch {batch}, latents {latent}x{latent} "
           f"({latent * 8} px), fp32, {threads} thread(s)")
    model = random_sd15_model()
    torch_unet = model.unet  # kept beside the session, so the two are timed in turns
    params = sum(p.numel() for p in torch_unet.parameters()) / 1e6
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, latent, latent, generator=g)
    embeds = torch.randn(batch, 77, 768, generator=g)
    t = torch.tensor(500.0)

    def torch_call() -> torch.Tensor:
        with torch.inference_mode():
            return torch_unet(sample, t, encoder_hidden_states=embeds, return_dict=False)[0]

    started = time.perf_counter()
    onnx_dir = export_onnx(model, work / "sd15-unet", components=("unet",)).root
    report(f"UNet parameters: {params:.0f}M")
    report(f"export (UNet only, opset 17, dynamic axes, ControlNet inputs): {time.perf_counter() - started:.0f} s, "
           f"{sum(f.stat().st_size for f in onnx_dir.rglob('*') if f.is_file()) / 2**30:.2f} GiB")
    prepare_onnxruntime(model, {"onnx_dir": str(onnx_dir), "threads": threads, "verify": "size"})
    gc.collect()

    def ort_call() -> torch.Tensor:
        with torch.inference_mode():
            return model.unet_call(sample, t, embeds)

    error = relative_error(torch_call(), ort_call())
    times = alternating_medians({"torch": torch_call, "ort": ort_call}, repeats)
    report("")
    report(f"| runtime | s / UNet call (median of {repeats}, timed in turns) | vs torch |")
    report("|---|---|---|")
    report(f"| torch eager | {times['torch']:.2f} | 1.00× (reference) |")
    report(f"| ONNX Runtime CPU | {times['ort']:.2f} | {times['torch'] / times['ort']:.2f}× faster |")
    report("")
    verdict = "within" if error <= 1e-3 else "ABOVE"
    report(f"max relative error of ONNX Runtime vs torch (max |Δ| / max |torch|): {error:.2e} ({verdict} the 1e-3 target)")
    report("")
    shutil.rmtree(onnx_dir, ignore_errors=True)


def whole_txt2img(report: Report, work: Path, label: str, source: str | Path, size: int, steps: int, repeats: int,
                  threads: int) -> None:
    from aipaint_plugins.onnx_runtime.export import export_onnx

    import aipaint

    torch_pipe = aipaint.load(source)
    onnx_dir = export_onnx(torch_pipe.model, work / f"{label}-onnx").root
    ort_pipe = aipaint.load(source, runtime="onnxruntime", runtime_options={"onnx_dir": str(onnx_dir), "threads": threads})
    params = dict(seed=11, steps=steps, width=size, height=size)
    times = alternating_medians({"torch": lambda: torch_pipe.txt2img(PROMPT, **params),
                                 "ort": lambda: ort_pipe.txt2img(PROMPT, **params)}, repeats)
    a = np.asarray(torch_pipe.txt2img(PROMPT, **params).images[0], dtype=np.int16)
    b = np.asarray(ort_pipe.txt2img(PROMPT, **params).images[0], dtype=np.int16)
    report(f"| {label} ({size} px, {steps} steps, {torch_pipe.model.defaults.sampler}) | {times['torch']:.3f} | "
           f"{times['ort']:.3f} | {times['torch'] / times['ort']:.2f}× | {int(np.abs(a - b).max())} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--latent", type=int, default=32, help="latent side of the full-size UNet test (32 = 256 px)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-full", action="store_true", help="skip the full-size UNet")
    parser.add_argument("--skip-pipelines", action="store_true", help="skip the whole-txt2img part")
    parser.add_argument("--save", default="onnx_vs_torch.txt", help="file name under benchmarks/results ('' to not save)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    report = Report()
    report("# ONNX Runtime vs torch eager on the CPU")
    report(environment())
    report("")
    with tempfile.TemporaryDirectory(prefix="aipaint-bench-") as tmp:
        work = Path(tmp)
        if not args.skip_full:
            full_size_unet(report, work, args.latent, args.batch, args.repeats, args.threads)
        if not args.skip_pipelines:
            from aipaint.models import zoo

            report(f"## 2. Whole txt2img, per image (median of {args.repeats}), CFG on")
            report("")
            report("| model | torch eager s | ONNX Runtime s | speed-up | max pixel diff (0-255) |")
            report("|---|---|---|---|---|")
            whole_txt2img(report, work, "tiny test model", tiny_model_folder(work / "tiny"), 64, 20, args.repeats, args.threads)
            try:
                card = zoo.find(zoo.DEFAULT_MODEL)
                source = zoo.fetch(card) if card else None
            except Exception as exc:  # the embedded model may not be trained/installed yet
                source = None
                report(f"| embedded model | not available: {exc} | | | |")
            if source is not None:
                whole_txt2img(report, work, f"embedded {zoo.DEFAULT_MODEL}", zoo.DEFAULT_MODEL, 32, 20, args.repeats,
                              args.threads)
    if args.save:
        print(f"saved {report.save(args.save)}")


if __name__ == "__main__":
    main()
