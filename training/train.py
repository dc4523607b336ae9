"""Train an autoencoder and export it as a model artifact.

    latentpack train --input-format mnist-sample --model-dir model/
    latentpack train --input 'shards/train-*.tfrecord' --input-format tfrecord --model-dir model/
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Optional

import numpy as np

from pipeline.formats import READERS
from training.spatial import KERNEL_STORAGE
from pipeline.errors import log, show_progress


@dataclasses.dataclass
class TrainConfig:
    """Every setting that shapes the model; stored in codec.json beside the weights."""

    arch: str = "conv"
    latent_dim: int = 32
    width: int = 16  # channels of the conv arch's first stage (the second has twice as many)
    latent_bits: int = 6
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 2e-3
    val_fraction: float = 0.1
    seed: int = 0
    # Rate-distortion training (training/rd.py) when set: loss = distortion + lmbda * bits per pixel.
    lmbda: Optional[float] = None
    quality: Optional[int] = None
    # Table sets of the entropy model (training.prior.add_mixture); 1: the factorized prior alone.
    mixture: int = 16

    @classmethod
    def from_quality(cls, quality: int, **settings) -> "TrainConfig":
        """The one place a dense `--quality` preset becomes settings (lambda, latent size, width)."""
        from training.rd import QUALITY_PRESETS

        lmbda, latent_dim, width = QUALITY_PRESETS[quality]
        return cls(**dict(settings, lmbda=lmbda, latent_dim=latent_dim, width=width, quality=quality))


def parse_args(argv=None):
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="latentpack train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", help="glob of training shards (not needed for mnist-sample)")
    p.add_argument("--input-format", default="tfrecord", choices=sorted(READERS), help="format of --input")
    p.add_argument("--model-dir", required=True, help="where to write the model artifact")
    p.add_argument("--arch", default=defaults.arch, choices=["conv", "mlp", "spatial", "hyperprior", "channelwise"],
                   help="conv: convolutional with a linear bottleneck (one image size); mlp: the reference tutorial "
                        "model; spatial: the fully convolutional photo codec (any image size, training/spatial.py); "
                        "hyperprior: the same with a scale hyperprior (training/hyperprior.py)")
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
    spatial.add_argument("--warmup-steps", type=int, default=0,
                         help="train the entropy model alone for this many steps first, on the fixed transforms of "
                              "--init-from (channelwise: a new entropy model on trained transforms)")
    spatial.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    spatial.add_argument("--checkpoint-dir", help="checkpoints and history (default: <model-dir>-checkpoints)")
    spatial.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    spatial.add_argument("--validate-every", type=int, default=2500, help="steps between held-out validations")
    spatial.add_argument("--init-from", help="start from another run's checkpoint weights (e.g. a new --quality), or from a "
                         "weights file (.npz, training.weights; a GPU run of scripts/gpu_train.py: without "
                         "--steps, that run is exported at its own step)")
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
    for name, value in (("--learning-rate", args.learning_rate), ("--lambda", args.lmbda)):
        if value is not None:
            need(np.isfinite(value) and value > 0, f"{name} must be a positive number", value)
    need(0 <= args.val_fraction < 1, "--val-fraction must be at least 0 and below 1", args.val_fraction)
    if args.arch in ("spatial", "hyperprior", "channelwise"):
        need(args.crop >= args.stride and args.crop % args.stride == 0,
             f"--crop must be a multiple of --stride {args.stride}", args.crop)


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


def split(images: np.ndarray, val_fraction: float, seed: int):
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = int(round(len(images) * val_fraction))
    return images[order[n_val:]], images[order[:n_val]]


def save_loss_curve(history: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name in ("loss", "val_loss"):
        if name in history:
            ax.plot(range(1, len(history[name]) + 1), history[name], label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(config: TrainConfig, images: np.ndarray, model_dir: str, extra: Optional[dict] = None) -> dict:
    """Train on uint8 images [N,H,W,C] and export the artifact; returns its codec spec."""
    import keras

    from training import export

    keras.utils.set_random_seed(config.seed)
    train_x, val_x = split(images, config.val_fraction, config.seed)
    image_shape = tuple(images.shape[1:])
    log.info("training %s on %d images %s, validating on %d", config.arch, len(train_x), image_shape, len(val_x))
    started = time.time()
    if config.lmbda is None:
        encoder, decoder, history = train_autoencoder(config, train_x, val_x)
        latents = encoder.predict(train_x.astype(np.float32) / 255.0, batch_size=1024, verbose=0)
        quantization = export.fit_quantization(latents, config.latent_bits)
        entropy = {}
    else:
        from training import prior, rd
        encoder, decoder, learned_prior, history = rd.train_rd(config, train_x, val_x)
        entropy_model = prior.freeze(learned_prior)
        if config.mixture > 1:
            latents = encoder.predict(train_x.astype(np.float32) / 255.0, batch_size=1024, verbose=0)
            entropy_model = prior.add_mixture(entropy_model, symbols_of(latents, entropy_model), config.mixture,
                                              seed=config.seed)
        quantization = export.integer_quantization(entropy_model)
        entropy = {"entropy_model": entropy_model}
    spec = {
        "latent_dim": config.latent_dim,
        "architecture": {"arch": config.arch, "latent_dim": config.latent_dim,
                         **({"width": config.width} if config.arch == "conv" else {})},
        "training": dict(dataclasses.asdict(config), train_images=int(len(train_x)),
                         seconds=round(time.time() - started, 1), final_loss=float(history["loss"][-1]),
                         **(extra or {})),
        **entropy,
    }
    # Written whole beside --model-dir and swapped in (export.staged); the curves before the
    # SavedModel, so that the fingerprint covers them too.
    with export.staged(model_dir) as out:
        save_loss_curve(history, os.path.join(out, "loss.png"))
        with open(os.path.join(out, "history.json"), "w") as f:
            json.dump(history, f)
        return export.export(out, encoder, decoder, image_shape, quantization, spec, val_x)


def symbols_of(latents: np.ndarray, entropy_model: dict) -> np.ndarray:
    """Float latents [N, D] -> the symbols the entropy coder codes: rounded, clipped to the tables, minus
    their offsets (what the exported `encode` signature and `EntropyCoder.symbols` make of them)."""
    offsets = np.asarray(entropy_model["offsets"], np.int64)
    sizes = np.array([len(t) for t in entropy_model["frequencies"]], np.int64)
    return np.clip(np.round(latents).astype(np.int64) - offsets, 0, sizes - 1)


def add_mixture_to(model_dir: str, images: np.ndarray, components: int = TrainConfig.mixture) -> dict:
    """Give a dense rate-distortion artifact exported before mixtures existed its mixture tables,
    fitted exactly as `train` fits them (on the training part of `images`, the same images it was
    trained on, split as it split them), with its validation code bytes measured again. The
    SavedModel is unchanged; codec.json and so the fingerprint change. Returns the new spec."""
    from pipeline.artifact import CODEC_FILE
    from pipeline.codecs import load_codec
    from pipeline.entropy import EntropyCoder
    from training import export, prior

    with open(os.path.join(model_dir, CODEC_FILE)) as f:
        raw = json.load(f)
    settings = raw["training"]
    train_x, val_x = split(images, settings["val_fraction"], settings["seed"])
    codec = load_codec(model_dir)

    def latents(x):
        return np.concatenate([codec.encode(x[i:i + 4096]) for i in range(0, len(x), 4096)]).astype(np.int64)

    model = prior.add_mixture(raw["entropy_model"], symbols_of(latents(train_x), raw["entropy_model"]), components,
                              seed=settings["seed"])
    metrics = dict(raw.get("metrics") or {})
    if len(val_x):
        metrics["val_code_bytes"] = float(np.mean([len(c) for c in EntropyCoder(model).encode(latents(val_x))]))
    return export.write_codec_json(model_dir, dict(raw, entropy_model=model, metrics=metrics,
                                                   training=dict(settings, mixture=components)))


def train_autoencoder(config: TrainConfig, train_x: np.ndarray, val_x: np.ndarray):
    """Plain MSE training with Keras `fit`: (encoder, decoder, history)."""
    import keras

    from training import model

    image_shape = tuple(train_x.shape[1:])
    encoder, decoder = model.build(config.arch, image_shape, config.latent_dim, config.width)
    inputs = keras.Input(image_shape)
    autoencoder = keras.Model(inputs, decoder(encoder(inputs)))
    autoencoder.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss="mse")
    x = train_x.astype(np.float32) / 255.0
    v = val_x.astype(np.float32) / 255.0
    history = autoencoder.fit(
        x, x, batch_size=config.batch_size, epochs=config.epochs, shuffle=True,
        validation_data=(v, v) if len(v) else None,
        # A progress bar on a terminal, one line per epoch in logs.
        verbose=1 if sys.stdout.isatty() else 2).history
    return encoder, decoder, history


def main(argv=None) -> int:
    show_progress()
    args = parse_args(argv)
    check_args(args)
    check_model_dir(args.model_dir)
    if args.arch in ("spatial", "hyperprior", "channelwise"):
        from training import spatial
        if not args.input:
            from pipeline.errors import LatentpackError
            raise LatentpackError(f"--arch {args.arch} needs --input (photos: images, parquet, tfrecord or webdataset)")
        return spatial.main(args)
    # The mlp arch reproduces the reference tutorial's settings unless told otherwise.
    reference = args.arch == "mlp"
    settings = dict(
        arch=args.arch, latent_bits=args.latent_bits, epochs=args.epochs,
        batch_size=args.batch_size or (256 if reference else TrainConfig.batch_size),
        learning_rate=args.learning_rate or (1e-3 if reference else TrainConfig.learning_rate),
        val_fraction=args.val_fraction, seed=args.seed, mixture=args.mixture)
    config = (TrainConfig.from_quality(args.quality, **settings) if args.quality is not None else
              TrainConfig(latent_dim=args.latent_dim, width=args.width, lmbda=args.lmbda, **settings))
    if not 1 <= args.mixture <= 256:
        from pipeline.errors import LatentpackError
        raise LatentpackError(f"--mixture must be between 1 and 256 (got {args.mixture})")
    from pipeline.formats import load_images

    _, images, _, bad = load_images(args.input, args.input_format, args.limit)
    if bad:
        log.warning("%d input records could not be used", bad)
    spec = train(config, images, args.model_dir,
                 extra={"input": args.input, "input_format": args.input_format, "bad_inputs": bad})
    m = spec["metrics"]
    size = (f"{m['val_code_bytes']:.1f} bytes/image entropy-coded" if "val_code_bytes" in m
            else f"{config.latent_bits} bits each")
    print(f"model written to {args.model_dir}: {spec['latent_dim']} latents, {size}, "
          f"validation PSNR {m.get('val_psnr', float('nan')):.2f} dB (min {m.get('val_psnr_min', float('nan')):.2f}) "
          f"on {m.get('val_images', 0)} images; fingerprint {spec['fingerprint'][:19]}…")
    return 0


if __name__ == "__main__":
    from pipeline.errors import guarded
    sys.exit(guarded(main)())
