"""Decode time: the full VAE against a tiny autoencoder (TAESD architecture, diffusers' AutoencoderTiny).

    python benchmarks/taesd.py [--n 5] [--threads 1] [--sizes 32,64]

Both networks are built from their configurations with random weights: decode time depends on
the architecture, not on the weights, so the timings stand for the real SD VAE (the config in
zoo/configs/sd15/vae) and the real TAESD (AutoencoderTiny's defaults, madebyollin/taesd's
shape). Picture quality needs the trained weights, which cannot be downloaded here: it is not
measured. The embedded model's own VAE (8x8 latents, 4x up-sampling) is timed too, against a
TAESD-shaped decoder with one up-sampling stage fewer (4x), also random.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, n: int) -> tuple[float, float]:
    """Median and spread (max - min) of ``n`` runs in seconds, after one warm-up."""
    with torch.inference_mode():
        fn()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times), max(times) - min(times)


def params(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def main(argv: list[str] | None = None) -> int:
    from diffusers import AutoencoderKL, AutoencoderTiny

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", default="32,64", help="latent sizes for the SD pair (64: 512x512 pictures)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    full = AutoencoderKL.from_config(json.loads((ROOT / "zoo/configs/sd15/vae/config.json").read_text())).eval()
    tiny = AutoencoderTiny().eval()
    print(f"threads {a.threads}, n {a.n} (median, spread = max - min); random weights (time only)")
    print(f"SD VAE decoder {params(full.decoder):.1f} M parameters; TAESD decoder {params(tiny.decoder):.2f} M")
    print(f"{'latents':<12}{'picture':<12}{'SD VAE s':>14}{'TAESD s':>14}{'speed-up':>10}")
    for size in [int(s) for s in a.sizes.split(",")]:
        z = torch.randn(1, 4, size, size)
        f, fs = timed(lambda z=z: full.decode(z / 0.18215, return_dict=False)[0], a.n)
        t, ts = timed(lambda z=z: tiny.decode(z, return_dict=False)[0], a.n)
        print(f"{f'{size}x{size}':<12}{f'{size * 8}x{size * 8}':<12}{f'{f:.3f}±{fs:.3f}':>14}{f'{t:.3f}±{ts:.3f}':>14}"
              f"{f / t:>9.1f}x", flush=True)
    sys.path.insert(0, str(ROOT))
    import aipaint

    pipe = aipaint.load()
    model = pipe.model
    small = AutoencoderTiny(encoder_block_out_channels=(64, 64, 64), decoder_block_out_channels=(64, 64, 64),
                            num_encoder_blocks=(1, 3, 3), num_decoder_blocks=(3, 3, 1)).eval()
    z = torch.randn(1, model.latent_channels, 8, 8)
    f, fs = timed(lambda: model.decode(z), a.n)
    t, ts = timed(lambda: small.decode(z, return_dict=False)[0], a.n)
    print(f"embedded model: its VAE decoder {params(model.vae.decoder):.2f} M parameters, {f:.4f}±{fs:.4f} s per 32x32 "
          f"picture; a TAESD-shaped 4x decoder {params(small.decoder):.2f} M, {t:.4f}±{ts:.4f} s ({f / t:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
