"""The spatial family's training and export: the transforms and a per-channel density of the latents.

    latentpack train --arch spatial --input 'photos/*.jpg' --input-format images \
        --quality 4 --steps 60000 --model-dir photo-q4/ [--resume]

The rate is modelled by a per-channel non-parametric density (`training.prior.DeepFactorizedPrior`),
frozen into integer tables at export. The loop, data and checkpoints are `training.loop`'s.
"""
from __future__ import annotations

from families.spatial.transforms import SpatialModule, build_transforms, transform_weights
from training.loop import PhotoConfig, PhotoTrainer, check_args, main as loop_main  # noqa: F401  (check_args: train's)


class SpatialTrainer(PhotoTrainer):
    """The factorized model: the transforms and a per-channel density of the latents."""

    def build(self, config: PhotoConfig) -> dict:
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

    def bits(self, y) -> float:
        """Estimated bits of one image's rounded latents [1, h, w, M]."""
        return float(self.prior.bits(y).numpy()[0])

    def export(self, model_dir: str, holdout, history: dict, extra: dict) -> dict:
        return export(self, model_dir, holdout, history, extra)


def export(trainer: SpatialTrainer, model_dir: str, holdout, history: dict, extra: dict) -> dict:
    """Freeze the prior to integer tables, write the SavedModel and codec.json."""
    from training.export import artifact_spec, write_photo_artifact
    from training.prior import freeze_channels

    entropy_model = freeze_channels(trainer.prior)
    module = SpatialModule(transform_weights(trainer.analysis, trainer.synthesis), trainer.config.latent_channels,
                           trainer.config.kernel_storage)
    spec = artifact_spec(trainer, "spatial", "deep-factorized-per-channel", entropy_model, history, extra)
    return write_photo_artifact(model_dir, module, ("encode", "decode"), spec, history, holdout)


TRAINER = SpatialTrainer


def main(args) -> int:
    return loop_main(args, "spatial")
