"""`latentpack train`: the command line of every family's training; `--arch` picks the family.

    latentpack train --input-format mnist-sample --model-dir model/            # dense (conv)
    latentpack train --arch channelwise --input 'photos/*.png' --input-format images --model-dir photo/

The settings are checked here, before any data is read; the family's `train.py` (found through
the registry, `families.for_arch`) trains and exports.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import families
from families.dense.train import TrainConfig
from families.spatial.transforms import KERNEL_STORAGE
from pipeline.errors import log, show_progress
from pipeline.formats import READERS


def parse_args(argv=None):
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="latentpack train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", help="glob of training shards (not needed for mnist-sample)")
    p.add_argument("--input-format", default="tfrecord", choices=sorted(READERS), help="format of --input")
    p.add_argument("--model-dir", required=True, help="where to write the model artifact")
    p.add_argument("--arch", default=defaults.arch, choices=families.archs(),
                   help="conv: convolutional with a linear bottleneck (one image size); mlp: the reference tutorial "
                        "model; spatial: the fully convolutional photo codec (any image size); hyperprior: the same "
                        "with a scale hyperprior (the shipped photo models); channelwise: with a channel-conditional "
                        "mean-scale prior; families/<family>/train.py")
    p.add_argument("--latent-dim", type=int, default=defaults.latent_dim, help="latent values per image")
    p.add_argument("--width", type=int, default=defaults.width, help="conv arch: channels of the first stage")
    p.add_argument("--latent-bits", type=int, default=defaults.latent_bits, choices=range(2, 17), metavar="2..16",
                   help="quantization bits per latent value (<=8 stores int8)")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="training epochs (conv, mlp)")
    spatial = p.add_argument_group("spatial arch (step-based, streamed random crops, resumable)")
    spatial.add_argument("--steps", type=int, default=None,
                         help="train until this many steps in all (default 50000; with --init-from a weights "
                              "file, that file's step: export it as it is)")
    spatial.add_argument("--crop", type=int, default=128, help="side of the random training crops")
    spatial.add_argument("--stride", type=int, default=16, choices=[8, 16],
                         help="downsampling of the latents: 16 (photos) or 8 (four times the latents: high-rate photo "
                              "models such as photo:6, and very small images, e.g. 32x32)")
    spatial.add_argument("--filters", type=int, default=None, help="channels of the hidden layers (N, default 64)")
    spatial.add_argument("--latent-channels", type=int, default=None, help="latent channels (M, default 96)")
    spatial.add_argument("--validation", help="glob of held-out images to validate on (same --input-format); "
                         "then every --input image is trained on (default: hold out the --input images whose "
                         "key's CRC32 is divisible by 10)")
    spatial.add_argument("--val-images", type=int, default=None, help="at most this many validation images (default 24)")
    spatial.add_argument("--slices", type=int, default=None,
                         help="channelwise: latent slices coded in sequence, each conditioned on those before (default 4)")
    spatial.add_argument("--context-filters", type=int, default=None,
                         help="channelwise: channels of each slice's context network (default 96)")
    spatial.add_argument("--warmup-steps", type=int, default=0,
                         help="train the entropy model alone for this many steps first, on the fixed transforms of "
                              "--init-from (channelwise: a new entropy model on trained transforms)")
    spatial.add_argument("--minutes", type=float, default=None,
                         help="a wall-clock budget: train until it is spent (the steps re-planned from the measured "
                              "rate, the last 15%% annealed), then export; --steps, if given, still caps it")
    spatial.add_argument("--export-anyway", action="store_true",
                         help="with --init-from a model: export the fit even when it does not beat that model on "
                              "the held-out images (by default it says so and writes nothing)")
    spatial.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    spatial.add_argument("--checkpoint-dir", help="checkpoints and history (default: <model-dir>-checkpoints)")
    spatial.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    spatial.add_argument("--validate-every", type=int, default=2500, help="steps between held-out validations")
    spatial.add_argument("--init-from", help="start from a model (a shipped name such as photo:4, or an artifact "
                         "folder: a hyperprior model also starts a channelwise one, computing the same at step 0), "
                         "another run's checkpoint weights (e.g. a new --quality), or a weights file (.npz, "
                         "training.weights; a GPU run of scripts/gpu_train.py: without --steps, that run is "
                         "exported at its own step)")
    spatial.add_argument("--kernel-storage", default=KERNEL_STORAGE, choices=["int8", "float16"],
                         help="how the exported model stores convolution kernels: int8 with a scale per filter "
                              "(30%% of float32's bytes) or float16 (half)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images per training step (default: {defaults.batch_size} for conv, 256 for mlp)")
    p.add_argument("--learning-rate", type=float, default=None,
                   help=f"Adam learning rate (default: {defaults.learning_rate} for conv, 0.001 for mlp)")
    p.add_argument("--mixture", type=int, default=defaults.mixture, metavar="K",
                   help="with --quality/--lambda: table sets of the entropy model, each code naming the set that "
                        "codes it shortest (1: one set, the learned factorized prior)")
    p.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                   help="fraction of the images held out for validation")
    p.add_argument("--limit", type=int, default=None, help="use at most this many input images")
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed (split, init, shuffling)")
    rd = p.add_mutually_exclusive_group()
    rd.add_argument("--quality", type=int, choices=range(1, 9), metavar="1..8",
                    help="rate-distortion training with a preset lambda and latent size, 1 = smallest codes, "
                         "8 = best quality; codes are entropy-coded (default: plain autoencoder)")
    rd.add_argument("--lambda", dest="lmbda", type=float,
                    help="rate-distortion training with this lambda (loss = MSE + lambda * bits per pixel)")
    return p.parse_args(argv)


# What a model artifact folder holds (training.export, training.spatial): train may replace these.
ARTIFACT_ENTRIES = {"saved_model.pb", "variables", "assets", "fingerprint.pb", "codec.json", "history.json",
                    "loss.png"}


def check_args(args) -> None:
    """Settings that cannot train a model: one clear error each, before any data is read."""
    from pipeline.errors import LatentpackError

    def need(ok: bool, what: str, value) -> None:
        if not ok:
            raise LatentpackError(f"{what} (got {value})")

    positive = [("--epochs", args.epochs), ("--latent-dim", args.latent_dim),
                ("--width", args.width), ("--checkpoint-every", args.checkpoint_every),
                ("--validate-every", args.validate_every)]
    positive += [(name, value) for name, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                                                   ("--filters", args.filters),
                                                   ("--latent-channels", args.latent_channels),
                                                   ("--limit", args.limit)) if value is not None]
    for name, value in positive:
        need(value >= 1, f"{name} must be at least 1", value)
    for name, value in (("--learning-rate", args.learning_rate), ("--lambda", args.lmbda),
                        ("--minutes", getattr(args, "minutes", None))):
        if value is not None:
            need(np.isfinite(value) and value > 0, f"{name} must be a positive number", value)
    need(0 <= args.val_fraction < 1, "--val-fraction must be at least 0 and below 1", args.val_fraction)
    family_check = getattr(families.for_arch(args.arch).trainer_module(), "check_args", None)
    if family_check is not None:
        family_check(args)


def check_model_dir(model_dir: str) -> None:
    """Train writes a whole artifact into --model-dir: a new or empty folder, or one holding an
    artifact (an earlier run's, replaced); never a folder of other files, nor a shipped model."""
    from pipeline import models
    from pipeline.errors import LatentpackError

    if models.is_shipped_name(model_dir):
        raise LatentpackError(f"--model-dir {model_dir} names a shipped model; train into a folder of your own")
    real = os.path.realpath(model_dir)
    for name, folder in models.shipped().items():
        if real == os.path.realpath(folder) or real.startswith(os.path.realpath(folder) + os.sep):
            raise LatentpackError(f"--model-dir {model_dir} is the shipped model {name}'s folder; train into a "
                                  "folder of your own")
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise LatentpackError(f"--model-dir {model_dir} is a file, not a folder")
    entries = set(os.listdir(model_dir)) if os.path.isdir(model_dir) else set()
    if entries and ("codec.json" not in entries or entries - ARTIFACT_ENTRIES):
        other = sorted(entries - ARTIFACT_ENTRIES) or sorted(entries)
        raise LatentpackError(f"--model-dir {model_dir} holds files that are not a model artifact ({other[0]}"
                              f"{', …' if len(other) > 1 else ''}); train into a new or empty folder")
    if entries:
        log.info("replacing the model artifact in %s", model_dir)


def main(argv=None) -> int:
    show_progress()
    args = parse_args(argv)
    check_args(args)
    check_model_dir(args.model_dir)
    return families.for_arch(args.arch).trainer_module().main(args)


if __name__ == "__main__":
    from pipeline.errors import guarded
    sys.exit(guarded(main)())
