"""The dense family's training: an autoencoder for one image shape (MNIST digits, thumbnails).

    latentpack train --input-format mnist-sample --model-dir model/
    latentpack train --input 'shards/train-*.tfrecord' --input-format tfrecord --quality 3 --model-dir q3/
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Optional

import numpy as np

from pipeline.errors import log


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
    # Table sets of the entropy model (families.dense.prior.add_mixture); 1: the factorized prior alone.
    mixture: int = 16

    @classmethod
    def from_quality(cls, quality: int, **settings) -> "TrainConfig":
        """The one place a dense `--quality` preset becomes settings (lambda, latent size, width)."""
        from families.dense.rd import QUALITY_PRESETS

        lmbda, latent_dim, width = QUALITY_PRESETS[quality]
        return cls(**dict(settings, lmbda=lmbda, latent_dim=latent_dim, width=width, quality=quality))


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

    from families.dense import export
    from training.export import staged

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
        from families.dense import prior, rd
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
    with staged(model_dir) as out:
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
    from pipeline.codec import load_codec
    from pipeline.entropy import EntropyCoder
    from families.dense import export, prior

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

    from families.dense import model

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


def check_args(args) -> None:
    from pipeline.errors import LatentpackError

    if not 1 <= args.mixture <= 256:
        raise LatentpackError(f"--mixture must be between 1 and 256 (got {args.mixture})")


def main(args) -> int:
    """`latentpack train --arch conv|mlp ...` (arguments parsed and checked by training.train)."""
    # The mlp arch reproduces the reference tutorial's settings unless told otherwise.
    reference = args.arch == "mlp"
    settings = dict(
        arch=args.arch, latent_bits=args.latent_bits, epochs=args.epochs,
        batch_size=args.batch_size or (256 if reference else TrainConfig.batch_size),
        learning_rate=args.learning_rate or (1e-3 if reference else TrainConfig.learning_rate),
        val_fraction=args.val_fraction, seed=args.seed, mixture=args.mixture)
    config = (TrainConfig.from_quality(args.quality, **settings) if args.quality is not None else
              TrainConfig(latent_dim=args.latent_dim, width=args.width, lmbda=args.lmbda, **settings))
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