"""The torch runtime's per-layer kernel choice on the CPU, measured (``prepack``,
:mod:`aipaint_plugins.torch_runtime.prepack`).

With ``prepack`` on (the default for SD-sized fp32 models on the CPU), each convolution and
linear layer of the UNet and the VAE takes, per call, the kernel that was fastest for its shape
here: oneDNN on a weight packed once, NNPACK's Winograd convolution (3x3, stride 1, at least 64x64
positions, one image at a time), or MKL's sgemm (linear layers from 512 rows up, or on one thread);
and diffusers' ResNet blocks run their element-wise steps in place. This script shows why, on a
full-size SD1.5 architecture with random weights, in one process:

1. every distinct convolution and linear shape the UNet (batch 2: one step with CFG) and the VAE
   decoder (batch 1) meet at ``--size``, each kernel timed on it, and which one the rule picks;
2. one UNet call and one VAE decode with the choice off (every layer on oneDNN's packed kernel,
   the ``prepack`` of before) and on, two copies of each network timed in turns, and the relative
   error between them.

    python benchmarks/cpu_kernels.py --size 256 --threads 2 --save cpu_kernels_256.txt
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Any

import torch
from _runtime_bench import ROOT, Report, build, environment, median_time, random_sd15_unet, relative_error
from aipaint_plugins.torch_runtime import prepack

_mkldnn = torch.ops.mkldnn


def vae() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return build(lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(ROOT / "zoo" / "configs" / "sd15" / "vae")), 1)


def nnpack_images(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pad: int) -> list[torch.Tensor]:
    return [torch._nnpack_spatial_convolution(x[i:i + 1], weight, bias, [pad] * 2) for i in range(x.shape[0])]


def shapes(unet: torch.nn.Module, decoder: Any, latent: int) -> tuple[dict, dict]:
    """The distinct (conv, input shape) and (linear, rows) the two networks meet, with their counts."""
    convs: dict[tuple, int] = {}
    linears: dict[tuple, int] = {}

    def conv_hook(m: torch.nn.Conv2d, args: tuple, out: torch.Tensor) -> None:
        key = (m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0], tuple(args[0].shape))
        convs[key] = convs.get(key, 0) + 1

    def linear_hook(m: torch.nn.Linear, args: tuple, out: torch.Tensor) -> None:
        key = (args[0].numel() // args[0].shape[-1], m.in_features, m.out_features)
        linears[key] = linears.get(key, 0) + 1

    handles = [m.register_forward_hook(conv_hook if isinstance(m, torch.nn.Conv2d) else linear_hook)
               for net in (unet, decoder) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.inference_mode():
        unet(torch.randn(2, 4, latent, latent), torch.tensor([500]), torch.randn(2, 77, 768))
        decoder.decode(torch.randn(1, 4, latent, latent))
    for handle in handles:
        handle.remove()
    return convs, linears


def kernel_table(report: Report, convs: dict, linears: dict, repeats: int) -> None:
    report("| layer | input | calls | oneDNN packed (ms) | other kernel (ms) | other / oneDNN | rule picks |")
    report("|---|---|---|---|---|---|---|")
    totals = {"onednn": 0.0, "best": 0.0, "rule": 0.0}
    for (cin, cout, k, stride, pad, shape), count in sorted(convs.items(), key=lambda kv: kv[0][5][-1]):
        conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad).eval()
        x = torch.randn(shape)
        with torch.inference_mode():
            packed = _mkldnn._reorder_convolution_weight(conv.weight, [pad] * 2, [stride] * 2, [1, 1], 1, list(shape))
            onednn = median_time(functools.partial(_mkldnn._convolution_pointwise, x, packed, conv.bias, [pad] * 2,
                                             [stride] * 2, [1, 1], 1, "none", [], ""), repeats)
            other, name = None, "—"
            if k == 3 and stride == 1 and prepack.nnpack_available():
                other, name = median_time(functools.partial(nnpack_images, x, conv.weight, conv.bias, pad), repeats), "NNPACK"
            rule = prepack.PackedConv2d(conv).wants_nnpack(x)
        totals["onednn"] += onednn * count
        totals["best"] += min(onednn, other or onednn) * count
        totals["rule"] += (other if rule else onednn) * count
        report(f"| conv {cin}→{cout} {k}x{k} s{stride} | {'x'.join(map(str, shape))} | {count} | {onednn * 1e3:.2f} | "
               + (f"{name} {other * 1e3:.2f} | {other / onednn:.2f} |" if other else "— | — |")
               + f" {'NNPACK' if rule else 'oneDNN'} |")
    for (rows, din, dout), count in sorted(linears.items()):
        layer = torch.nn.Linear(din, dout).eval()
        x = torch.randn(rows, din)
        with torch.inference_mode():
            packed = _mkldnn._reorder_linear_weight(layer.weight, None)
            onednn = median_time(functools.partial(_mkldnn._linear_pointwise, x, packed, layer.bias, "none", [], ""), repeats)
            mkl = median_time(functools.partial(torch.nn.functional.linear, x, layer.weight, layer.bias), repeats)
        rule = rows >= prepack.LINEAR_MKL_MIN_ROWS or torch.get_num_threads() == 1
        totals["onednn"] += onednn * count
        totals["best"] += min(onednn, mkl) * count
        totals["rule"] += (mkl if rule else onednn) * count
        report(f"| linear {din}→{dout} | {rows} rows | {count} | {onednn * 1e3:.2f} | MKL {mkl * 1e3:.2f} | "
               f"{mkl / onednn:.2f} | {'MKL' if rule else 'oneDNN'} |")
    report("")
    report(f"Sum over the calls of one UNet call and one decode, each layer alone: every layer on oneDNN "
           f"{totals['onednn']:.2f} s, the rule's kernels {totals['rule']:.2f} s, the fastest kernel per shape "
           f"{totals['best']:.2f} s.")


def networks(choose: bool) -> tuple[torch.nn.Module, Any]:
    prepack.CHOOSE_KERNELS = choose  # read at install (the ResNet blocks) and at every call
    unet, decoder = random_sd15_unet(), vae()
    prepack.install_prepacked(unet)
    prepack.install_prepacked(decoder)
    return unet, decoder


def calls_section(report: Report, latent: int, repeats: int) -> None:
    sides = {False: networks(False), True: networks(True)}
    args = (torch.randn(2, 4, latent, latent), torch.tensor([500]), torch.randn(2, 77, 768))
    z = torch.randn(1, 4, latent, latent)
    times: dict[tuple[bool, str], list[float]] = {}
    outputs = {}
    with torch.inference_mode():
        for choose, (unet, decoder) in sides.items():
            prepack.CHOOSE_KERNELS = choose
            outputs[choose] = (unet(*args).sample, decoder.decode(z).sample)
        for _ in range(repeats):
            for choose, (unet, decoder) in sides.items():
                prepack.CHOOSE_KERNELS = choose
                for name, fn in (("unet", functools.partial(unet, *args)), ("vae", functools.partial(decoder.decode, z))):
                    started = time.perf_counter()
                    fn()
                    times.setdefault((choose, name), []).append(time.perf_counter() - started)
    prepack.CHOOSE_KERNELS = True
    report(f"| network | every layer on oneDNN (s, median of {repeats}) | kernels chosen (s) | speed-up | all (off / on) | relative error |")
    report("|---|---|---|---|---|---|")
    for index, name in enumerate(("unet", "vae")):
        off, on = statistics.median(times[(False, name)]), statistics.median(times[(True, name)])
        report(f"| {'UNet call, batch 2' if name == 'unet' else 'VAE decode'} | {off:.3f} | {on:.3f} | {off / on:.2f}× | "
               f"{', '.join(f'{t:.2f}' for t in times[(False, name)])} / {', '.join(f'{t:.2f}' for t in times[(True, name)])} | "
               f"{relative_error(outputs[False][index], outputs[True][index]):.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image side (the latent is size / 8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sections", default="kernels,calls")
    parser.add_argument("--save", default="", help="file under benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = Report()
    report(f"# The torch runtime's kernel choice, full-size SD1.5 (random weights), {args.size} px, {args.threads} thread(s)")
    report(environment())
    report(f"NNPACK available: {prepack.nnpack_available()}")
    report("")
    latent = args.size // 8
    if "kernels" in args.sections:
        report("## 1. Every layer shape, each kernel alone")
        unet, decoder = random_sd15_unet(), vae()
        convs, linears = shapes(unet, decoder, latent)
        del unet, decoder
        kernel_table(report, convs, linears, args.repeats)
        report("")
    if "calls" in args.sections:
        report("## 2. Whole networks, the choice off and on (in turns)")
        calls_section(report, latent, args.repeats)
    if args.save:
        print(f"saved {report.save(args.save)}")


if __name__ == "__main__":
    main()
