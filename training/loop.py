"""The training loop of the photo families: settings, the trainer base, checkpoints, curves.

    latentpack train --arch hyperprior --input 'photos/*.jpg' --input-format images \
        --quality 4 --steps 60000 --model-dir photo-q4/ [--resume]

Loss = lambda * 255^2 * MSE + bits per pixel (CompressAI's convention, so its lambdas carry
over). Training is step-based from random crops of variable-size images read through the
pipeline's readers (`training.data`), with checkpoints every few hundred steps so a run of hours
survives interruption and continues with `--resume`; each family's trainer
(`families/<name>/train.py`) gives the model and its losses.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import List, Optional

import numpy as np

from pipeline.errors import log
from training.config import QUALITY_LAMBDAS, PhotoConfig  # noqa: F401  (the families' import them here)
from training.curves import save_curves
from training.data import load_holdout, padded_batch, photos, random_crops  # noqa: F401  (random_crops: for families' exports)

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


class PhotoTrainer:
    """A photo model's variables, optimizer and step, with checkpointing. Each family's trainer
    (`families/<name>/train.py`) gives `build` (the named parts, in checkpoint order), `losses`,
    `rate` (for the entropy-model warm-up), `bits` (validation) and `export`."""

    def __init__(self, config: PhotoConfig):
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

    def schedule(self, step: int, total: Optional[int] = None) -> float:
        """Constant, then the last 15% of the steps (--steps, or what --minutes leaves room for)
        anneals linearly to 1/10 of the rate."""
        total = total or self.config.steps
        start = 0.85 * total
        if step < start:
            return self.config.learning_rate
        frac = min(1.0, (step - start) / max(1.0, total - start))
        return self.config.learning_rate * (1.0 - 0.9 * frac)

    def evaluate(self, images: List[np.ndarray]) -> dict:
        """Validation on whole images (padded, cropped back): PSNR and estimated bits per pixel."""
        import tensorflow as tf

        from pipeline.images import psnr

        psnrs, bpps, mses = [], [], []
        for image in images:
            h, w = image.shape[:2]
            y = tf.round(self.analysis(padded_batch(image, self.config.stride).astype(np.float32) / 255.0,
                                       training=False))
            x_hat = np.round(np.clip(self.synthesis(y, training=False).numpy()[0, :h, :w], 0, 1) * 255.0)
            psnrs.append(psnr(image[None], x_hat[None])[0])
            mses.append(float(np.mean((image.astype(np.float64) - x_hat) ** 2)))
            bpps.append(self.bits(y) / (h * w))
        bpp, mse = float(np.mean(bpps)), float(np.mean(mses))
        # The training objective on the 0..255 scale, as the verdict measures it on real codes.
        return {"val_psnr": float(np.mean(psnrs)), "val_bpp": bpp, "val_mse": mse,
                "val_loss": bpp + self.config.lmbda * mse}

    def build(self, config) -> dict:
        raise NotImplementedError

    def losses(self, x):
        """(MSE, bits per pixel) of a training batch."""
        raise NotImplementedError

    def bits(self, y) -> float:
        """Estimated bits of one image's rounded latents [1, h, w, M]."""
        raise NotImplementedError

    def export(self, model_dir: str, holdout, history: dict, extra: dict) -> dict:
        raise NotImplementedError


def train(config: PhotoConfig, pattern: str, input_format: str, model_dir: str, checkpoint_dir: str,
          resume: bool = False, init_from: Optional[str] = None, extra: Optional[dict] = None,
          validation: Optional[str] = None) -> dict:
    """Train (or continue) and export the artifact; returns its codec spec. With `validation` (a
    pattern of held-out photos) every --input image is trained on and those validate."""
    import keras
    import tensorflow as tf

    from pipeline.errors import LatentpackError
    from training.export import staged

    import families

    keras.utils.set_random_seed(config.seed)
    trainer = families.family(config.family).trainer_module().TRAINER(config)
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
    elif init_from and _is_model(init_from):  # a shipped model's name or an artifact folder
        from training import weights

        arrays, start = weights.from_model(init_from, config.family)
        weights.assign(trainer, arrays, init_from, require_all=False)
        trainer.step.assign(0)
        history["start"] = start
        log.info("initialized weights from the model %s (%s), step 0", init_from, start["family"])
    elif init_from:
        if not (tf.train.latest_checkpoint(init_from) or tf.io.gfile.exists(init_from + ".index")):
            raise LatentpackError(f"--init-from {init_from}: no training checkpoint there")
        latest = trainer.init_from(init_from)
        log.info("initialized weights from %s", latest)
    if next(photos(pattern, input_format, None, False, config.holdout_every), None) is None:
        raise LatentpackError(f"no readable training images in --input {pattern!r} ({input_format}) outside the "
                              "held-out split")
    os.makedirs(checkpoint_dir, exist_ok=True)
    holdout = load_holdout(pattern, input_format, config, validation)
    log.info("%s model N=%d M=%d lambda=%g: %d held-out validation images, crops %d, batch %d, to step %d",
                 config.family, config.filters, config.latent_channels, config.lmbda, len(holdout), config.crop,
                 config.batch_size, config.steps)
    crops = tf.data.Dataset.from_generator(
        lambda: random_crops(pattern, input_format, config, config.seed + int(trainer.step)),
        output_signature=tf.TensorSpec([config.crop, config.crop, 3], tf.float32))
    batches = iter(crops.batch(config.batch_size).prefetch(4))
    started, window_start, window_steps = time.time(), time.time(), 0
    sums = np.zeros(3)
    step = int(trainer.step)
    total = config.steps  # with --minutes: re-planned from the measured rate every 100 steps
    deadline = started + 60.0 * config.minutes if config.minutes else None
    if holdout and "start" in history and "val_start" not in history:
        # A fit from a model: its held-out figures at step 0, so that every validation says what it gained.
        history["val_start"] = dict(trainer.evaluate(holdout), step=step)
    while step < total:
        if deadline is not None and time.time() >= deadline:
            log.info("--minutes %g reached at step %d", config.minutes, step)
            break
        trainer.optimizer.learning_rate.assign(trainer.schedule(step, total))
        step_fn = trainer.entropy_step if step < config.warmup_steps else trainer.train_step
        values = [float(t) for t in step_fn(next(batches))]
        if not np.isfinite(values[0]):
            raise LatentpackError(f"loss is {values[0]} at step {step + 1}: training diverged; resume from the last "
                             f"checkpoint in {checkpoint_dir} with a lower --learning-rate")
        sums += values
        step += 1
        window_steps += 1
        if step % 100 == 0 or step == total:
            rate = window_steps / max(time.time() - window_start, 1e-9)
            if deadline is not None:
                total = min(config.steps, step + max(1, int(rate * max(0.0, deadline - time.time()))))
            loss, mse, bpp = sums / window_steps
            # The entropy-model warm-up computes no reconstruction: its rows have no PSNR.
            train_psnr = float(10 * np.log10(1 / max(mse, 1e-10))) if np.isfinite(mse) else None
            history["train"].append({"step": step, "loss": loss, "psnr": train_psnr, "bpp": bpp})
            eta = (total - step) / max(rate, 1e-9)
            quality = (f"train PSNR {train_psnr:.2f} dB at {bpp:.3f} bpp" if train_psnr is not None
                       else f"entropy model alone: {bpp:.3f} bpp")
            print(f"step {step}/{total}: loss {loss:.4f}, {quality}; {rate:.1f} steps/s, "
                  f"ETA {eta / 60:.0f} min", flush=True)
            history["seconds"] += time.time() - window_start
            sums, window_steps, window_start = np.zeros(3), 0, time.time()
        if holdout and (step % config.validate_every == 0 or step == total):
            metrics = dict(trainer.evaluate(holdout), step=step)
            history["val"].append(metrics)
            first = history.get("val_start")
            gain = (f"; held-out loss {metrics['val_loss']:.4f}, {metrics['val_loss'] / first['val_loss'] - 1:+.1%} "
                    f"against the start model" if first else "")
            print(f"  validation at step {step}: {metrics['val_psnr']:.2f} dB at {metrics['val_bpp']:.3f} bpp "
                  f"(estimated) on {len(holdout)} held-out images{gain}", flush=True)
        if step % config.checkpoint_every == 0 or step == total:
            manager.save(checkpoint_number=step)
            with open(history_path + ".tmp", "w") as f:
                json.dump(history, f)
            os.replace(history_path + ".tmp", history_path)
    log.info("trained to step %d in %.0f s this run", step, time.time() - started)
    if not (manager.latest_checkpoint or "").endswith(f"-{step}"):  # weights from a file, not trained here
        manager.save(checkpoint_number=step)  # so that --resume can continue them
        with open(history_path, "w") as f:
            json.dump(history, f)
    start_dir = _start_model(init_from)
    try:
        with staged(model_dir) as out:  # written whole beside --model-dir, then swapped in
            spec = trainer.export(out, holdout, history, dict(extra or {}, input=pattern, input_format=input_format))
            if start_dir and holdout:
                spec["verdict"] = judge(start_dir, init_from, spec, holdout, config, checkpoint_dir)
                if not spec["verdict"]["better"] and not config.export_anyway:
                    raise _NotBetter(spec)
    except _NotBetter as e:  # staged() removed what was written; an earlier --model-dir stays as it was
        e.spec["exported"] = False
        return e.spec
    spec["exported"] = True
    return spec


class _NotBetter(Exception):
    def __init__(self, spec):
        super().__init__("not better than its start")
        self.spec = spec


def _start_model(init_from: Optional[str]) -> Optional[str]:
    """The artifact folder a run started from (--init-from a model), else None."""
    if not init_from or init_from.endswith(".npz") or not _is_model(init_from):
        return None
    from pipeline import models

    return models.resolve(init_from)


def judge(start_dir: str, start_name: str, spec: dict, holdout, config: PhotoConfig, checkpoint_dir: str) -> dict:
    """The held-out verdict of a fit against the model it started from (both through the pipeline's
    codec, real codes), printed and kept in <checkpoint-dir>/verdict.json. Beside it, the bits the
    fit saves at its own PSNR against the shipped models of its start's family (a curve through
    them, where the start is one) and against WebP and AVIF on the same held-out images."""
    from training.measure import classical_curves, equal_quality, measure_codec, verdict

    start = measure_codec(start_dir, holdout)
    result = verdict(start, spec["metrics"], config.lmbda)
    s, f = result["start"], result["fit"]
    curves = dict(classical_curves(holdout))
    ladder = _shipped_ladder(start_dir, start, holdout)
    if ladder:
        curves["shipped"] = ladder
    result["equal_psnr"] = equal_quality(f, curves)
    result["curves"] = curves
    print(f"held-out verdict on {f['val_images']} images: {start_name} {s['val_psnr']:.2f} dB at "
          f"{s['val_bpp']:.4f} bpp, this fit {f['val_psnr']:.2f} dB at {f['val_bpp']:.4f} bpp "
          f"({result['bits_change']:+.1%} bits, {result['psnr_change']:+.2f} dB); loss (bpp + lambda*MSE) "
          f"{result['fit_loss']:.4f} vs {result['start_loss']:.4f}: "
          + ("better" if result["better"] else "NOT better" + ("" if config.export_anyway else
                                                               ": not exported (--export-anyway to keep it)")),
          flush=True)
    names = {"shipped": "the shipped models", "webp": "WebP", "avif": "AVIF"}
    print("  bits at the fit's PSNR against " + "; ".join(
        f"{names.get(k, k)}: " + (f"{v:+.1%}" if v is not None else "outside their range")
        for k, v in result["equal_psnr"].items()), flush=True)
    with open(os.path.join(checkpoint_dir, "verdict.json"), "w") as fh:
        json.dump(dict(result, start_model=start_name), fh, indent=1)
    return result


def _shipped_ladder(start_dir: str, start: dict, holdout) -> list:
    """Held-out figures of every shipped model of the start's family when the start is one of them
    (photo:4 -> photo:1, 2, 4, 6), for a rate-distortion curve; else []."""
    from pipeline import models
    from pipeline.artifact import read_spec
    from training.measure import measure_codec

    shipped = models.shipped()
    here = os.path.realpath(start_dir)
    if here not in {os.path.realpath(d) for d in shipped.values()}:
        return []
    family = read_spec(start_dir).family
    ladder = []
    for name, folder in shipped.items():
        if os.path.realpath(folder) == here:
            ladder.append(dict(start, model=name))
        elif read_spec(folder).family == family:
            ladder.append(dict(measure_codec(folder, holdout), model=name))
    return ladder


def _is_model(name: str) -> bool:
    """A shipped model's name (photo:4) or a folder holding an artifact's codec.json."""
    from pipeline import models

    if models.is_shipped_name(name):
        models.resolve(name)  # an unknown name: one error listing the shipped ones
        return True
    return os.path.isfile(os.path.join(name, "codec.json"))


def check_args(args) -> None:
    """The photo families' settings: crops that fit the stride, and photos to train on."""
    from pipeline.errors import LatentpackError

    if not (args.crop >= args.stride and args.crop % args.stride == 0):
        raise LatentpackError(f"--crop must be a multiple of --stride {args.stride} (got {args.crop})")
    if not args.input:
        raise LatentpackError(f"--arch {args.arch} needs --input (photos: images, parquet, tfrecord or webdataset)")


def _default_steps(init_from: Optional[str]) -> int:
    """--steps left out: a trained weights file's own step (export it as it is), else 50,000."""
    if init_from and init_from.endswith(".npz") and os.path.isfile(init_from):
        from training import weights

        step = weights.read(init_from)[1]
        if step > 0:
            return step
    return 50000


def main(args, family: str) -> int:
    """`latentpack train --arch <a photo family> ...` (arguments parsed by training.train)."""
    defaults = PhotoConfig()
    lmbda = args.lmbda if args.lmbda is not None else QUALITY_LAMBDAS[args.quality or 4]
    config = PhotoConfig(
        filters=args.filters or defaults.filters, latent_channels=args.latent_channels or defaults.latent_channels,
        lmbda=lmbda, quality=args.quality if args.lmbda is None else None, crop=args.crop,
        batch_size=args.batch_size or defaults.batch_size,
        steps=args.steps or (10 ** 9 if args.minutes else _default_steps(args.init_from)),
        learning_rate=args.learning_rate or defaults.learning_rate, seed=args.seed,
        holdout_every=0 if args.validation else defaults.holdout_every,
        val_images=args.val_images or defaults.val_images, warmup_steps=args.warmup_steps,
        checkpoint_every=args.checkpoint_every, validate_every=args.validate_every,
        family=family, stride=args.stride, slices=args.slices or defaults.slices,
        minutes=args.minutes, export_anyway=args.export_anyway,
        context_filters=args.context_filters or defaults.context_filters,
        kernel_storage=args.kernel_storage)
    checkpoint_dir = args.checkpoint_dir or args.model_dir.rstrip("/") + "-checkpoints"
    spec = train(config, args.input, args.input_format, args.model_dir, checkpoint_dir,
                 resume=args.resume, init_from=args.init_from, validation=args.validation)
    m = spec["metrics"]
    if not spec.get("exported", True):
        print(f"nothing written to {args.model_dir}: the fit does not beat {args.init_from} on the held-out images "
              f"(see {checkpoint_dir}/verdict.json; --export-anyway keeps it)")
        return 0
    print(f"model written to {args.model_dir}: {args.arch}, {config.latent_channels} latent channels, "
          f"held-out {m.get('val_psnr', float('nan')):.2f} dB at {m.get('val_bpp', float('nan')):.3f} bpp "
          f"on {m.get('val_images', 0)} images; fingerprint {spec['fingerprint'][:19]}…")
    return 0
