"""A GAN baseline: what diffusion replaced, trained and sampled through the same tools.

A small DCGAN-style generator and a Wasserstein critic (:mod:`.networks`), trained with weight
clipping (WGAN) or a gradient penalty (WGAN-GP), unconditioned or conditioned on the caption's
words (:mod:`.train`); a trained folder loads as a model family whose model can do ``txt2img``
only (:mod:`.model`)::

    aipaint train gan my-pictures/ -o my-gan --loss wgan-gp --minutes 5
    aipaint generate -m my-gan "a red circle" --seed 1 --batch-size 8

    from aipaint_plugins.gan.train import train_gan
    train_gan("my-pictures/", "my-gan", loss="wgan", minutes=5)
    aipaint.load("my-gan").txt2img("a red circle", seed=1)

Heavy imports stay inside the functions: ``aipaint --help`` must not import torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from aipaint import hookimpl
from aipaint.api.options import OptionGroup
from aipaint.errors import ModelLoadError, UnsupportedFeature
from aipaint.models.family import LoadOptions, ModelFamily, ModelSource

if TYPE_CHECKING:
    from aipaint_plugins.gan.model import GANModel


class GANFamily(ModelFamily):
    name = "gan"
    load_options = ()
    aliases = ("wgan", "dcgan")
    description = "a DCGAN-style generator trained as a Wasserstein GAN (aipaint train gan); 32×32, txt2img only"
    default_size = (32, 32)

    def identify(self, source: ModelSource) -> bool:
        from aipaint_plugins.gan.model import is_gan_folder

        return source.kind == "folder" and is_gan_folder(source.path)

    def load(self, source: ModelSource, options: LoadOptions) -> GANModel:
        from aipaint_plugins.gan.model import load_gan

        if options.runtime != "torch":
            raise UnsupportedFeature(f"GAN models run on the torch runtime only, not {options.runtime!r}")
        if source.kind != "folder":
            raise ModelLoadError(f"{source.path.name}: a GAN loads from the folder `aipaint train gan` writes, "
                                 "not a single file")
        return load_gan(source.path, family=self.name, name=source.name, device=options.device, dtype=options.dtype,
                        card=source.card)


def cmd_train_gan(args: argparse.Namespace) -> int:
    import torch
    from aipaint_plugins.gan.train import train_gan

    from aipaint.cli.api import progress_bar

    if args.threads:
        torch.set_num_threads(args.threads)
    update, close = progress_bar(not args.no_progress and sys.stderr.isatty(),
                                 unit="step" if args.steps is not None or args.minutes is None else "s")

    def show(record: dict[str, float]) -> None:
        if update is None:  # no bar: a line now and then instead
            if int(record["step"]) % (args.print_every or 1) == 0:
                print(f"step {int(record['step'])}  {record['seconds']:.0f} s  critic {record['critic_loss']:+.4f}  "
                      f"generator {record['generator_loss']:+.4f}  W≈{record['wasserstein']:.4f}", file=sys.stderr)

    try:
        report = train_gan(
            args.data_dir, args.output, loss=args.loss, condition=args.condition, steps=args.steps,
            minutes=args.minutes, batch_size=args.batch_size, learning_rate=args.learning_rate, n_critic=args.n_critic,
            clip_value=args.clip, gp_weight=args.gp_weight, word_dropout=args.word_dropout, z_dim=args.z_dim,
            channels=args.channels, seed=args.seed, overwrite=args.overwrite, progress=update, on_record=show,
        )
    finally:
        close()
    print(report.output)
    print(f"{report.steps} generator steps on {report.images} images in {report.seconds:.0f} s ({report.loss}, "
          f"condition {report.condition}); critic's Wasserstein estimate at the end {report.final_wasserstein:.4f}",
          file=sys.stderr)
    return 0


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint.cli.api import command_group

    train = command_group(subparsers, "train", "train adapters (LoRA, …) and models on your images")
    p = train.add_parser(
        "gan",
        help="train a small Wasserstein GAN (32×32) from a folder of images and same-name .txt captions",
        description="Train a DCGAN-style generator against a Wasserstein critic, with weight clipping (wgan) or a "
        "gradient penalty (wgan-gp), and save a model folder `aipaint generate -m` loads. Every picture is resized "
        "to 32×32.",
    )
    p.add_argument("data_dir", help="folder of images (png/jpg/webp) with same-name .txt captions")
    p.add_argument("-o", "--output", required=True, help="output model folder")
    p.add_argument("--loss", choices=["wgan", "wgan-gp"], default="wgan-gp",
                   help="weight clipping (Arjovsky et al.) or gradient penalty (Gulrajani et al.); default wgan-gp")
    p.add_argument("--condition", choices=["none", "words"], default="words",
                   help="unconditional, or conditioned on the caption's words (default)")
    p.add_argument("--steps", type=int, help="generator updates (default 2000 when --minutes is not given)")
    p.add_argument("--minutes", type=float, help="stop after this much wall-clock time")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", "--learning-rate", type=float, dest="learning_rate",
                   help="learning rate (default: the paper's: 5e-5 RMSprop for wgan, 1e-4 Adam for wgan-gp)")
    p.add_argument("--n-critic", type=int, default=5, help="critic updates per generator update (default 5)")
    p.add_argument("--clip", type=float, default=0.01, help="wgan: critic weight clipping bound (default 0.01)")
    p.add_argument("--gp-weight", type=float, default=10.0, help="wgan-gp: gradient penalty weight λ (default 10)")
    p.add_argument("--word-dropout", type=float, default=0.5,
                   help="words: probability of dropping each caption word in training (default 0.5)")
    p.add_argument("--z-dim", type=int, default=64, help="noise vector size (default 64)")
    p.add_argument("--channels", type=int, default=32, help="base width of both networks (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing GAN folder at --output")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--print-every", type=int, default=100, help="without a progress bar: a loss line every N steps")
    p.set_defaults(func=cmd_train_gan)


@hookimpl
def register_options(register: Callable[[type[OptionGroup]], None]) -> None:
    from aipaint_plugins.gan.options import GANOptions

    register(GANOptions)


@hookimpl
def register_models(register: Callable[[ModelFamily], None]) -> None:
    register(GANFamily())
