"""The spatial photo codec (Ballé et al. 2017, "bls2017"): training on streamed crops, and export.

    latentpack train --arch spatial --input 'photos/*.jpg' --input-format images \
        --quality 4 --steps 60000 --model-dir photo-q4/ [--resume]

Analysis: four stride-2 5x5 convolutions with GDN between them, down to latents of
shape [H/16, W/16, M]; synthesis: the mirror image with IGDN and transposed
convolutions. The rate is modelled by a per-channel non-parametric density
(`training.prior.DeepFactorizedPrior`), frozen into integer tables at export.
Loss = lambda * 255^2 * MSE + bits per pixel (CompressAI's convention, so its lambdas
carry over). Training is step-based from random crops of variable-size images read
through the pipeline's readers, with checkpoints every few hundred steps so a run of
hours survives interruption and continues with `--resume`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import zlib
from typing import Iterator, List, Optional

import numpy as np

from pipeline.errors import log

# --quality 1..8 -> lambda, as CompressAI's bmshj2018-factorized presets.
QUALITY_LAMBDAS = {1: 0.0018, 2: 0.0035, 3: 0.0067, 4: 0.0130, 5: 0.0250, 6: 0.0483, 7: 0.0932, 8: 0.1800}
STRIDE = 16
KERNEL_STORAGE = "int8"  # how exported SavedModels store convolution kernels (`stored_kernel`)


@dataclasses.dataclass
class SpatialConfig:
    """Every setting that shapes a spatial model and its training; stored in codec.json."""

    filters: int = 64  # N: channels of the hidden layers
    latent_channels: int = 96  # M: channels of the latent tensor
    lmbda: float = QUALITY_LAMBDAS[4]
    quality: Optional[int] = None
    crop: int = 128
    batch_size: int = 8
    steps: int = 50000
    learning_rate: float = 3e-4
    clip_norm: float = 1.0
    crops_per_image: int = 4
    checkpoint_every: int = 500
    validate_every: int = 2500
    val_images: int = 24
    holdout_every: int = 10  # keys with crc32(key) % holdout_every == 0 are never trained on
    seed: int = 0
    prior: str = "factorized"  # or "hyperprior" (training/hyperprior.py)
    stride: int = STRIDE  # 16: four stride-2 stages (photos); 8: three, for very small images (CIFAR-10)
    kernel_storage: str = KERNEL_STORAGE  # how the exported SavedModel stores kernels (`stored_kernel`)
    warmup_steps: int = 0  # the first steps train the entropy model alone, on fixed transforms (`rate`)
    slices: int = 4  # channelwise: latent slices coded in sequence
    context_filters: int = 96  # channelwise: channels of each slice's context network


def build_transforms(filters: int, latent_channels: int, channels: int = 3, stride: int = STRIDE):
    """(analysis, synthesis) Keras models for images of any size (a multiple of `stride`): log2(stride)
    stride-2 stages, GDN between them."""
    import keras
    from keras import layers

    from training.layers import GDN

    def conv(n, name):
        return layers.Conv2D(n, 5, strides=2, padding="same", name=name)

    def deconv(n, name):
        return layers.Conv2DTranspose(n, 5, strides=2, padding="same", name=name)

    stages = int(np.log2(stride))
    analysis, synthesis = [keras.Input((None, None, channels))], [keras.Input((None, None, latent_channels))]
    for i in range(stages - 1):
        analysis += [conv(filters, f"conv{i}"), GDN(name=f"gdn{i}")]
        synthesis += [deconv(filters, f"deconv{i}"), GDN(inverse=True, name=f"igdn{i}")]
    analysis.append(conv(latent_channels, f"conv{stages - 1}"))
    synthesis.append(deconv(channels, f"deconv{stages - 1}"))
    return keras.Sequential(analysis, name="analysis"), keras.Sequential(synthesis, name="synthesis")


def is_holdout(key: str, every: int) -> bool:
    return every > 0 and zlib.crc32(key.encode()) % every == 0


def padded_batch(image: np.ndarray, stride: int = STRIDE) -> np.ndarray:
    """One (H, W, C) image as a batch of one, edge-padded as the pipeline pads it for the model."""
    from pipeline.codecs.spatial import pad_to_multiple

    return pad_to_multiple(image[None], stride)


def holdout_files(folder: str, every: int = SpatialConfig.holdout_every, ext: str = ".jpg") -> list:
    """The files of a folder of photos that training holds out (by the key, the name without
    extension): what the photo benchmarks evaluate on."""
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder))
            if n.endswith(ext) and is_holdout(n[:-len(ext)], every)]


def _photos(pattern: str, input_format: str, rng, holdout: Optional[bool], every: int) -> Iterator[tuple]:
    """(key, uint8 RGB image) for each readable image, shards in random order; holdout None = all."""
    from pipeline.errors import BadImage
    from pipeline.formats import get_reader
    from pipeline.images import decode_photo

    reader = get_reader(input_format)
    shards, root = reader.match(pattern)
    for i in rng.permutation(len(shards)) if rng is not None else range(len(shards)):
        for rec in reader.records(shards[i], root):
            if rec.error is not None or (holdout is not None and is_holdout(rec.key, every) != holdout):
                continue
            try:
                if rec.pixels is not None:
                    image = np.asarray(rec.pixels, np.uint8)
                    image = image[..., None] if image.ndim == 2 else image
                else:
                    image = decode_photo(rec.encoded).pixels
            except (BadImage, ValueError):
                continue
            yield rec.key, (np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3])


def random_crops(pattern: str, input_format: str, config: SpatialConfig, seed: int) -> Iterator[np.ndarray]:
    """An endless stream of float32 [crop, crop, 3] training crops (random position and flip),
    mixed through a shuffle buffer; never holds more than the buffer in memory."""
    rng = np.random.default_rng(seed)
    buffer: List[np.ndarray] = []
    size = config.crop
    while True:
        found = False
        for _, image in _photos(pattern, input_format, rng, False, config.holdout_every):
            found = True
            if image.shape[0] < size or image.shape[1] < size:
                image = np.pad(image, ((0, max(0, size - image.shape[0])), (0, max(0, size - image.shape[1])),
                                       (0, 0)), mode="reflect" if min(image.shape[:2]) > 1 else "edge")
            # An image no larger than the crop (CIFAR-10's 32x32 at crop 32) gives one crop, not copies.
            same = image.shape[0] == size and image.shape[1] == size
            for _ in range(1 if same else config.crops_per_image):
                y = rng.integers(0, image.shape[0] - size + 1)
                x = rng.integers(0, image.shape[1] - size + 1)
                crop = image[y:y + size, x:x + size]
                if rng.random() < 0.5:
                    crop = crop[:, ::-1]
                buffer.append(crop)
            while len(buffer) >= 256:
                yield buffer.pop(rng.integers(len(buffer))).astype(np.float32) / 255.0
        if not found:
            raise ValueError(f"no training images in {pattern!r} outside the held-out split")


def init_weights_from(trainer, checkpoint: str) -> str:
    """Load another run's transform and prior weights (not its optimizer state or step): how the
    other quality levels start. Returns the checkpoint read.

    The prior's weights reach a checkpoint through the optimizer that trained them (Keras 3
    keeps a layer's lists of weights out of TensorFlow's object graph), so they are read back
    through a throwaway optimizer over the same variables."""
    import keras
    import tensorflow as tf

    throwaway = keras.optimizers.Adam()
    throwaway.build(trainer.variables)
    source = tf.train.Checkpoint(optimizer=throwaway, **trainer.parts)
    latest = tf.train.latest_checkpoint(checkpoint) or checkpoint
    source.restore(latest).expect_partial()
    return latest


class SpatialTrainer:
    """The model's variables, optimizer and step, with checkpointing. Subclasses (the hyperprior)
    change `build` (the named parts, in checkpoint order) and `losses`."""

    def __init__(self, config: SpatialConfig):
        import keras
        import tensorflow as tf

        self.config = config
        self.parts = parts = self.build(config)
        for name, part in parts.items():
            setattr(self, name, part)
        self.variables = [v for part in parts.values() for v in part.trainable_variables]
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate)
        self.optimizer.build(self.variables)
        self.checkpoint = tf.train.Checkpoint(step=self.step, optimizer=self.optimizer, **parts)
        lmbda = tf.constant(config.lmbda * 255.0 ** 2, tf.float32)

        @tf.function
        def train_step(x):
            with tf.GradientTape() as tape:
                mse, bpp = self.losses(x)
                loss = lmbda * mse + bpp
            grads = tape.gradient(loss, self.variables)
            grads, _ = tf.clip_by_global_norm(grads, config.clip_norm)
            self.optimizer.apply_gradients(zip(grads, self.variables))
            self.step.assign_add(1)
            return loss, mse, bpp

        @tf.function
        def entropy_step(x):
            # Transforms held fixed: a new entropy model learns on a trained model's latents first,
            # before its early, poor rates can pull the transforms away (no synthesis computed).
            y = tf.stop_gradient(self.analysis(x, training=False))
            with tf.GradientTape() as tape:
                bpp = self.rate(y, tf.cast(tf.reduce_prod(tf.shape(x)[1:3]), tf.float32))
            grads = tape.gradient(bpp, self.entropy_variables)
            grads, _ = tf.clip_by_global_norm(grads, config.clip_norm)
            self.optimizer.apply_gradients(zip(grads, self.entropy_variables))
            self.step.assign_add(1)
            return bpp, tf.constant(np.nan, tf.float32), bpp

        self.train_step, self.entropy_step = train_step, entropy_step
        self.entropy_variables = [v for name, part in parts.items() if name not in ("analysis", "synthesis")
                                  for v in part.trainable_variables]

    def rate(self, y, pixels):
        """Bits per pixel of a batch of float latents (rounded straight through where the model
        needs integers, uniform noise for the likelihood): the loss of `entropy_step`."""
        raise NotImplementedError(f"{type(self).__name__} has no entropy-model warm-up")

    def build(self, config: SpatialConfig) -> dict:
        from training.prior import DeepFactorizedPrior

        analysis, synthesis = build_transforms(config.filters, config.latent_channels, stride=config.stride)
        return {"analysis": analysis, "synthesis": synthesis, "prior": DeepFactorizedPrior(config.latent_channels)}

    def losses(self, x):
        """(MSE, bits per pixel) of a training batch: noisy latents for the rate, rounded ones
        (straight-through) for the decoder, as it will get them at inference."""
        import tensorflow as tf

        y = self.analysis(x, training=True)
        noisy = y + tf.random.uniform(tf.shape(y), -0.5, 0.5)
        rounded = y + tf.stop_gradient(tf.round(y) - y)
        x_hat = self.synthesis(rounded, training=True)
        mse = tf.reduce_mean(tf.square(x - x_hat))
        pixels = tf.cast(tf.reduce_prod(tf.shape(x)[1:3]), tf.float32)
        return mse, tf.reduce_mean(self.prior.bits(noisy)) / pixels

    def init_from(self, checkpoint: str) -> str:
        """Start from another run of this family and size (all its weights: how another quality
        level starts), or from any photo run's image transforms (a factorized run's under a
        hyperprior, a hyperprior's under a channelwise model): the entropy model, new, trains
        quickly on top of transforms that already took hours."""
        import tensorflow as tf

        from pipeline.errors import LatentpackError

        latest = tf.train.latest_checkpoint(checkpoint) or checkpoint
        # Keras 3 saves the weights under the optimizer's list of them: the same shapes in the same
        # order (and no more) is a run of this family and size.
        shapes = dict(tf.train.list_variables(latest))
        stored = [shapes.get(f"optimizer/_trainable_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE")
                  for i in range(len(self.variables) + 1)]
        if stored == [list(v.shape) for v in self.variables] + [None]:
            return init_weights_from(self, latest)
        before = self.synthesis.layers[-1].kernel.numpy().copy()
        tf.train.Checkpoint(analysis=self.analysis, synthesis=self.synthesis).restore(latest).expect_partial()
        if np.array_equal(before, self.synthesis.layers[-1].kernel.numpy()):
            raise LatentpackError(f"--init-from {latest}: holds no photo transforms of this size to start from")
        return latest

    def export(self, model_dir: str, holdout, history: dict, extra: dict) -> dict:
        return export(self, model_dir, holdout, history, extra)

    def schedule(self, step: int) -> float:
        """Constant, then the last 15% of --steps anneals linearly to 1/10 of the rate."""
        start = 0.85 * self.config.steps
        if step < start:
            return self.config.learning_rate
        frac = min(1.0, (step - start) / max(1.0, self.config.steps - start))
        return self.config.learning_rate * (1.0 - 0.9 * frac)

    def evaluate(self, images: List[np.ndarray]) -> dict:
        """Validation on whole images (padded, cropped back): PSNR and estimated bits per pixel."""
        import tensorflow as tf

        from pipeline.images import psnr

        psnrs, bpps = [], []
        for image in images:
            h, w = image.shape[:2]
            y = tf.round(self.analysis(padded_batch(image, self.config.stride).astype(np.float32) / 255.0,
                                       training=False))
            x_hat = self.synthesis(y, training=False).numpy()[0, :h, :w]
            psnrs.append(psnr(image[None], np.round(np.clip(x_hat, 0, 1) * 255.0)[None])[0])
            bpps.append(self.bits(y) / (h * w))
        return {"val_psnr": float(np.mean(psnrs)), "val_bpp": float(np.mean(bpps))}

    def bits(self, y) -> float:
        """Estimated bits of one image's rounded latents [1, h, w, M]."""
        return float(self.prior.bits(y).numpy()[0])


def load_holdout(pattern: str, input_format: str, config: SpatialConfig,
                 validation: Optional[str] = None) -> List[np.ndarray]:
    """The validation photos: the first `val_images` held-out ones of --input, or with a
    `validation` pattern (a held-out set of one's own) up to `val_images` of those, spread evenly
    over them in key order (so that every kind of photo in it is seen)."""
    if validation is None:
        images = []
        for _, image in _photos(pattern, input_format, None, True, config.holdout_every):
            images.append(image)
            if len(images) >= config.val_images:
                break
        return images
    found = sorted(_photos(validation, input_format, None, None, 0), key=lambda item: item[0])
    if len(found) > config.val_images:
        found = [found[i] for i in np.linspace(0, len(found) - 1, config.val_images).round().astype(int)]
    return [image for _, image in found]


def save_curves(history: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    log = history.get("train", [])
    if log:
        steps = [r["step"] for r in log]
        axes[0].plot(steps, [r["loss"] for r in log], label="train loss")
        axes[0].set_yscale("log")
        axes[0].legend()
    val = history.get("val", [])
    if val:
        ax = axes[1]
        ax.plot([r["step"] for r in val], [r["val_psnr"] for r in val], "o-", label="PSNR (dB)")
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in val], [r["val_bpp"] for r in val], "s--", color="C1", label="bpp")
        ax2.set_ylabel("bits per pixel")
        ax.set_ylabel("held-out PSNR (dB)")
        ax.set_xlabel("step")
    axes[0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(config: SpatialConfig, pattern: str, input_format: str, model_dir: str, checkpoint_dir: str,
          resume: bool = False, init_from: Optional[str] = None, extra: Optional[dict] = None,
          validation: Optional[str] = None) -> dict:
    """Train (or continue) and export the artifact; returns its codec spec. With `validation` (a
    pattern of held-out photos) every --input image is trained on and those validate."""
    import keras
    import tensorflow as tf

    from pipeline.errors import LatentpackError
    from training.export import staged

    keras.utils.set_random_seed(config.seed)
    if config.prior == "hyperprior":
        from training.hyperprior import HyperpriorTrainer
        trainer = HyperpriorTrainer(config)
    elif config.prior == "channelwise":
        from training.channelwise import ChannelwiseTrainer
        trainer = ChannelwiseTrainer(config)
    else:
        trainer = SpatialTrainer(config)
    manager = tf.train.CheckpointManager(trainer.checkpoint, checkpoint_dir, max_to_keep=2)
    history_path = os.path.join(checkpoint_dir, "history.json")
    history = {"train": [], "val": [], "seconds": 0.0}
    if manager.latest_checkpoint and not resume:
        raise LatentpackError(f"{checkpoint_dir} holds the checkpoints of an earlier run: continue it with "
                              "--resume, or start afresh with another --checkpoint-dir")
    if resume and manager.latest_checkpoint:
        trainer.checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        if os.path.exists(history_path):
            with open(history_path) as f:
                history = json.load(f)
        log.info("resumed from %s at step %d", manager.latest_checkpoint, int(trainer.step))
    elif init_from and init_from.endswith(".npz"):  # a weights file (training.weights): a GPU run's, say
        from training import weights

        if not os.path.isfile(init_from):
            raise LatentpackError(f"--init-from {init_from}: no such weights file")
        step, history, missing = weights.load(trainer, init_from, require_all=False)
        history = dict({"train": [], "val": [], "seconds": 0.0}, **history)
        log.info("initialized weights from %s at step %d%s", init_from, step,
                 f" ({len(missing)} weights new: {', '.join(missing[:3])}…)" if missing else "")
    elif init_from:
        if not (tf.train.latest_checkpoint(init_from) or tf.io.gfile.exists(init_from + ".index")):
            raise LatentpackError(f"--init-from {init_from}: no training checkpoint there")
        latest = trainer.init_from(init_from)
        log.info("initialized weights from %s", latest)
    if next(_photos(pattern, input_format, None, False, config.holdout_every), None) is None:
        raise LatentpackError(f"no readable training images in --input {pattern!r} ({input_format}) outside the "
                              "held-out split")
    os.makedirs(checkpoint_dir, exist_ok=True)
    holdout = load_holdout(pattern, input_format, config, validation)
    log.info("%s model N=%d M=%d lambda=%g: %d held-out validation images, crops %d, batch %d, to step %d",
                 config.prior, config.filters, config.latent_channels, config.lmbda, len(holdout), config.crop,
                 config.batch_size, config.steps)
    crops = tf.data.Dataset.from_generator(
        lambda: random_crops(pattern, input_format, config, config.seed + int(trainer.step)),
        output_signature=tf.TensorSpec([config.crop, config.crop, 3], tf.float32))
    batches = iter(crops.batch(config.batch_size).prefetch(4))
    started, window_start, window_steps = time.time(), time.time(), 0
    sums = np.zeros(3)
    step = int(trainer.step)
    while step < config.steps:
        trainer.optimizer.learning_rate.assign(trainer.schedule(step))
        step_fn = trainer.entropy_step if step < config.warmup_steps else trainer.train_step
        values = [float(t) for t in step_fn(next(batches))]
        if not np.isfinite(values[0]):
            raise LatentpackError(f"loss is {values[0]} at step {step + 1}: training diverged; resume from the last "
                             f"checkpoint in {checkpoint_dir} with a lower --learning-rate")
        sums += values
        step += 1
        window_steps += 1
        if step % 100 == 0 or step == config.steps:
            rate = window_steps / max(time.time() - window_start, 1e-9)
            loss, mse, bpp = sums / window_steps
            mse = mse if np.isfinite(mse) else 1.0  # entropy-model warm-up: no reconstruction computed
            history["train"].append({"step": step, "loss": loss, "psnr": float(10 * np.log10(1 / max(mse, 1e-10))),
                                     "bpp": bpp})
            eta = (config.steps - step) / max(rate, 1e-9)
            print(f"step {step}/{config.steps}: loss {loss:.4f}, train PSNR {10 * np.log10(1 / max(mse, 1e-10)):.2f} dB "
                  f"at {bpp:.3f} bpp; {rate:.1f} steps/s, ETA {eta / 60:.0f} min", flush=True)
            history["seconds"] += time.time() - window_start
            sums, window_steps, window_start = np.zeros(3), 0, time.time()
        if holdout and (step % config.validate_every == 0 or step == config.steps):
            metrics = dict(trainer.evaluate(holdout), step=step)
            history["val"].append(metrics)
            print(f"  validation at step {step}: {metrics['val_psnr']:.2f} dB at {metrics['val_bpp']:.3f} bpp "
                  f"(estimated) on {len(holdout)} held-out images", flush=True)
        if step % config.checkpoint_every == 0 or step == config.steps:
            manager.save(checkpoint_number=step)
            with open(history_path + ".tmp", "w") as f:
                json.dump(history, f)
            os.replace(history_path + ".tmp", history_path)
    log.info("trained to step %d in %.0f s this run", step, time.time() - started)
    if not (manager.latest_checkpoint or "").endswith(f"-{step}"):  # weights from a file, not trained here
        manager.save(checkpoint_number=step)  # so that --resume can continue them
        with open(history_path, "w") as f:
            json.dump(history, f)
    with staged(model_dir) as out:  # written whole beside --model-dir, then swapped in
        return trainer.export(out, holdout, history, dict(extra or {}, input=pattern, input_format=input_format))


def export(trainer: SpatialTrainer, model_dir: str, holdout, history: dict, extra: dict) -> dict:
    """Freeze the prior to integer tables, write the SavedModel and codec.json (format 2)."""
    from training.export import write_codec_json
    from training.prior import freeze_channels

    entropy_model = freeze_channels(trainer.prior)
    module = SpatialModule(transform_weights(trainer.analysis, trainer.synthesis), trainer.config.latent_channels,
                           trainer.config.kernel_storage)
    spec = artifact_spec(trainer, "spatial", "deep-factorized-per-channel", entropy_model, history, extra)
    spec["metrics"] = measure(module, entropy_model, holdout, trainer.config.stride)
    save_artifact(model_dir, module, ("encode", "decode"), history)
    return write_codec_json(model_dir, spec)


def artifact_spec(trainer: SpatialTrainer, family: str, prior: str, entropy_model: dict, history: dict,
                  extra: dict) -> dict:
    """codec.json's fields shared by the photo families (metrics and fingerprint still to add)."""
    config = trainer.config
    return {
        "family": family,
        "stride": config.stride,
        "channels": 3,
        "latent_channels": config.latent_channels,
        "latent_dtype": "int16",
        "architecture": {"arch": family, "filters": config.filters, "latent_channels": config.latent_channels,
                         "transform": "bls2017-gdn", "prior": prior},
        "training": dict(dataclasses.asdict(config), steps_done=int(trainer.step),
                         seconds=round(history.get("seconds", 0.0), 1), **extra),
        "entropy_model": entropy_model,
    }


def save_artifact(model_dir: str, module, signatures, history: dict) -> None:
    """The SavedModel with the module's named signatures, and the training curves beside it."""
    import tensorflow as tf

    os.makedirs(model_dir, exist_ok=True)
    save_curves(history, os.path.join(model_dir, "loss.png"))
    with open(os.path.join(model_dir, "history.json"), "w") as f:
        json.dump(history, f)
    tf.saved_model.save(module, model_dir, signatures={name: getattr(module, name) for name in signatures})


def measure(module, entropy_model: dict, images, stride: int = STRIDE) -> dict:
    """Held-out PSNR and the exact ideal code length from the frozen integer tables."""
    from pipeline.images import psnr

    if not images:
        return {}
    offsets = np.asarray(entropy_model["offsets"])
    tables = entropy_model["frequencies"]
    logp = [np.log2(np.asarray(t, np.float64) / (1 << entropy_model["precision"])) for t in tables]
    psnrs, bpps = [], []
    for image in images:
        h, w = image.shape[:2]
        latent = module.encode(padded_batch(image, stride))["latent"].numpy()[0]
        recon = module.decode(latent[None])["image"].numpy()[0, :h, :w]
        bits = 0.0
        for c in range(latent.shape[-1]):
            symbols = np.clip(latent[..., c].astype(np.int64) - offsets[c], 0, len(tables[c]) - 1)
            bits -= logp[c][symbols].sum()
        psnrs.append(psnr(image[None], recon[None])[0])
        bpps.append(bits / (h * w))
    return {"val_psnr": float(np.mean(psnrs)), "val_bpp": float(np.mean(bpps)), "val_images": len(images)}


def measure_codec(model_dir: str, images) -> dict:
    """Held-out PSNR and bits per pixel of a written artifact, through the pipeline's own codec
    (`load_codec`: real codes, decoded as the decode job decodes them); also the worst photo."""
    from pipeline import latents
    from pipeline.codecs import load_codec
    from pipeline.errors import LatentpackError
    from pipeline.images import ImageBatch, psnr

    if not images:
        return {}
    codec = load_codec(model_dir)
    schema = latents.schema(codec.spec, "code")
    psnrs, bpps = [], []
    for i, image in enumerate(images):
        batch = ImageBatch([f"val{i}"], image[None], np.full(1, -1, np.int64), np.zeros(1, bool))
        columns = codec.compress(batch, "code")
        table = latents.to_table(batch.keys, columns, batch.labels, batch.has_label, schema)
        decoded = list(codec.decompress(table))
        if len(decoded) != 1 or not isinstance(decoded[0], ImageBatch):
            raise LatentpackError(f"{model_dir}: a held-out photo does not decode ({decoded[0]})")
        psnrs.append(float(psnr(image[None], decoded[0].images[:1])[0]))
        bpps.append(8.0 * len(columns["code"][0].as_py()) / (image.shape[0] * image.shape[1]))
    return {"val_psnr": float(np.mean(psnrs)), "val_bpp": float(np.mean(bpps)), "val_psnr_min": min(psnrs),
            "val_images": len(images)}


def transform_weights(analysis, synthesis) -> dict:
    """The trained transforms as plain arrays: per layer ("conv", kernel, bias) or ("gdn", beta, gamma)."""
    def layers_of(model):
        out = []
        for layer in model.layers:
            if hasattr(layer, "gamma_v"):
                out.append(("gdn", np.asarray(layer.beta), np.asarray(layer.gamma), bool(layer.inverse)))
            else:
                out.append(("conv", np.asarray(layer.kernel), np.asarray(layer.bias), "Transpose" in type(layer).__name__))
        return out
    return {"analysis": layers_of(analysis), "synthesis": layers_of(synthesis)}


def stored_kernel(kernel: np.ndarray, storage: str = KERNEL_STORAGE, name: str = "kernel"):
    """A convolution kernel [kh, kw, a, b] as the SavedModel stores it: (variable, scale variable or None).

    "int8": symmetric 8-bit integers with one float32 scale per filter (per input and output
    channel: max |w| over the kh x kw taps / 127), a quarter of float32's bytes plus 4 bytes per
    25 weights; "float16": half. `dequantize` computes the kernel back. (One scale per output
    channel cost photo:4's synthesis 0.09 dB; one per filter 0.01.)"""
    import tensorflow as tf

    if storage == "float16":
        return tf.Variable(kernel.astype(np.float16), trainable=False, name=name), None
    scale = (np.abs(kernel.astype(np.float64)).max(axis=(0, 1), keepdims=True) / 127.0).astype(np.float32)
    scale[scale == 0] = 1.0
    q = np.clip(np.round(kernel / scale.astype(np.float64)), -127, 127).astype(np.int8)
    return (tf.Variable(q, trainable=False, name=name),
            tf.Variable(scale, trainable=False, name=name + "_scale"))


def dequantize(kernel, scale, dtype):
    """The stored kernel in `dtype` (exact for both storages: int8 * float32 scale in float32 or float64)."""
    import tensorflow as tf

    kernel = tf.cast(kernel, dtype)
    return kernel if scale is None else kernel * tf.cast(scale, dtype)


def SpatialModule(weights: dict, latent_channels: int, storage: str = KERNEL_STORAGE,
                  synthesis_dtype: str = "float64"):
    """A tf.Module whose `encode`/`decode` signatures are the artifact's file format:
    uint8 images [N, H, W, 3] (H, W multiples of 16) <-> int16 latents [N, H/16, W/16, M].

    The graph is written with TensorFlow ops alone (no Keras objects in the SavedModel).
    Convolution kernels are stored as int8 with a float32 scale per filter
    (`stored_kernel`; models exported before 2026-11-30 store float16) and computed in floating
    point: about 30% of float32's bytes, for 0.01–0.02 dB on the shipped models (`metrics` hold
    the figures of the stored model; `--kernel-storage float16` exports the other way). GDN parameters stay float32, since gamma is often below
    float16's normal range. The decoder computes in float64 (`synthesis_dtype`): its pixels then
    match on any machine, thread count or oneDNN setting except in the rarest ties (in float32,
    isolated pixels came out one level apart between oneDNN on and off); it costs about twice
    the synthesis time.
    """
    import tensorflow as tf

    from pipeline.codecs.spatial import apply_transform

    def variables(layers, prefix):
        out = []
        for i, (kind, a, b, flag) in enumerate(layers):
            if kind == "conv":
                a, scale = stored_kernel(a, storage, f"{prefix}{i}_a")
            else:
                a, scale = tf.Variable(a.astype(np.float32), trainable=False, name=f"{prefix}{i}_a"), None
            out.append((kind, a, tf.Variable(b.astype(np.float32), trainable=False, name=f"{prefix}{i}_b"), flag,
                        scale))
        return out

    class _Module(tf.Module):
        def __init__(self):
            super().__init__()
            self.analysis = variables(weights["analysis"], "analysis")
            self.synthesis = variables(weights["synthesis"], "synthesis")

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
        def encode(self, images):
            y = apply_transform(self.analysis, tf.cast(images, tf.float32) / 255.0, synthesis=False)
            return {"latent": tf.cast(tf.clip_by_value(tf.round(y), -32767.0, 32767.0), tf.int16)}

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, latent_channels], tf.int16, name="latent")])
        def decode(self, latent):
            x = apply_transform(self.synthesis, tf.cast(latent, synthesis_dtype), synthesis=True)
            return {"image": tf.cast(tf.round(tf.clip_by_value(x, 0.0, 1.0) * 255.0), tf.uint8)}

    return _Module()


def _default_steps(init_from: Optional[str]) -> int:
    """--steps left out: a trained weights file's own step (export it as it is), else 50,000."""
    if init_from and init_from.endswith(".npz") and os.path.isfile(init_from):
        from training import weights

        step = weights.read(init_from)[1]
        if step > 0:
            return step
    return 50000


def main(args) -> int:
    """`latentpack train --arch spatial ...` (arguments parsed by training.train)."""
    defaults = SpatialConfig()
    lmbda = args.lmbda if args.lmbda is not None else QUALITY_LAMBDAS[args.quality or 4]
    config = SpatialConfig(
        filters=args.filters or defaults.filters, latent_channels=args.latent_channels or defaults.latent_channels,
        lmbda=lmbda, quality=args.quality if args.lmbda is None else None, crop=args.crop,
        batch_size=args.batch_size or defaults.batch_size, steps=args.steps or _default_steps(args.init_from),
        learning_rate=args.learning_rate or defaults.learning_rate, seed=args.seed,
        holdout_every=0 if args.validation else defaults.holdout_every,
        val_images=args.val_images or defaults.val_images, warmup_steps=args.warmup_steps,
        checkpoint_every=args.checkpoint_every, validate_every=args.validate_every,
        prior=args.arch if args.arch in ("hyperprior", "channelwise") else "factorized", stride=args.stride,
        kernel_storage=args.kernel_storage)
    checkpoint_dir = args.checkpoint_dir or args.model_dir.rstrip("/") + "-checkpoints"
    spec = train(config, args.input, args.input_format, args.model_dir, checkpoint_dir,
                 resume=args.resume, init_from=args.init_from, validation=args.validation)
    m = spec["metrics"]
    print(f"model written to {args.model_dir}: {args.arch}, {config.latent_channels} latent channels, "
          f"held-out {m.get('val_psnr', float('nan')):.2f} dB at {m.get('val_bpp', float('nan')):.3f} bpp "
          f"on {m.get('val_images', 0)} images; fingerprint {spec['fingerprint'][:19]}…")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it as: latentpack train --arch spatial ...")
