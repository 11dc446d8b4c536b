"""One SD1.5 UNet call on the CPU in fp32 and in bf16, as the torch runtime's ``precision=bf16`` runs it.

Needs only torch, diffusers and accelerate (no aipaint install), so it can run on any machine
with a copy of the repository: what a CPU's bf16 units (AMX, AVX512_BF16) are worth there.
The bf16 sides store the weights in bf16 and cast the inputs, exactly as
``aipaint_plugins.torch_runtime.precision.apply_bf16`` does (the timestep stays float32).
Sides are timed in turns; the error is max |bf16 - fp32| / max |fp32| on the same inputs.

    python benchmarks/cpu_bf16_unet.py --threads 2 --latent 32 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def cpu_description() -> str:
    flags: set[str] = set()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            if key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "amx_fp16")
    return f"{name}; flags: {' '.join(f for f in wanted if f in flags) or 'none of ' + ', '.join(wanted)}"


def random_unet() -> torch.nn.Module:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(ROOT / "zoo" / "configs" / "sd15" / "unet")
    with init_empty_weights(include_buffers=False):
        unet = UNet2DConditionModel.from_config(config)
    generator = torch.Generator().manual_seed(0)
    for sub in unet.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            tensor = torch.empty(param.shape)
            if name == "weight" and "norm" in type(sub).__name__.lower():
                tensor.fill_(1.0)
            elif name == "bias":
                tensor.zero_()
            else:
                tensor.normal_(0.0, 0.02, generator=generator)
            sub._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
    return unet.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px images)")
    parser.add_argument("--batch", type=int, default=2, help="2 = one step with classifier-free guidance")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--channels-last", action="store_true", help="also time bf16 in channels-last format")
    args = parser.parse_args()
    print(f"# SD1.5 UNet (random weights), batch {args.batch}, {args.latent * 8} px, fp32 vs bf16 weights")
    print(f"{cpu_description()}; torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    started = time.perf_counter()
    fp32 = random_unet()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    sides = {"fp32": fp32, "bf16": bf16}
    if args.channels_last:
        sides["bf16 channels-last"] = copy.deepcopy(bf16).to(memory_format=torch.channels_last)
    print(f"built in {time.perf_counter() - started:.0f} s")
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(args.batch, 4, args.latent, args.latent, generator=g)
    embeds = torch.randn(args.batch, 77, 768, generator=g)
    t = torch.tensor([500.0] * args.batch)

    def call(unet: torch.nn.Module) -> torch.Tensor:
        dtype = next(unet.parameters()).dtype
        x = sample.to(dtype)
        if next(unet.parameters()).is_contiguous(memory_format=torch.channels_last) and unet is not fp32:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return unet(x, t, encoder_hidden_states=embeds.to(dtype), return_dict=False)[0].float()

    for threads in args.threads:
        torch.set_num_threads(threads)
        outputs = {name: call(unet) for name, unet in sides.items()}  # also the warm-up
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, unet in sides.items():
                begun = time.perf_counter()
                call(unet)
                times[name].append(time.perf_counter() - begun)
        reference = outputs["fp32"]
        print(f"\n{threads} thread(s), median of {args.repeats} in turns:")
        print("| side | s / UNet call | all | vs fp32 | max rel. error vs fp32 |")
        print("|---|---|---|---|---|")
        base = statistics.median(times["fp32"])
        for name in sides:
            median = statistics.median(times[name])
            error = float((outputs[name] - reference).abs().max() / reference.abs().max())
            print(f"| {name} | {median:.3f} | {', '.join(f'{x:.2f}' for x in times[name])} | {base / median:.2f}× | "
                  f"{error:.2e} |")


if __name__ == "__main__":
    main()
