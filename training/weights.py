"""A photo model's trainable weights as plain named arrays (`.npz`): how a run moves between
TensorFlow and the GPU trainer (`scripts/gpu_train.py`, PyTorch), and how a shipped artifact
becomes the starting point of a new run when its checkpoints are gone.

Names are "<part>/<layer>/<weight>" for the Keras transforms ("analysis/conv0/kernel",
"synthesis/igdn1/gamma", "hyper_synthesis/hdeconv2/bias") and "<part>/<weight>" for the
density of the side information ("prior/matrix0"), in Keras' layouts: convolution kernels
[kh, kw, in, out], transposed ones [kh, kw, out, in], GDN's beta and gamma reparameterized as
`families.spatial.layers.GDN` stores them. Besides the weights a file holds `step` (the steps trained)
and `history` (the training history as JSON: losses, validations, seconds, where it ran).

    python -m training.weights photo:6 run.npz --kernels float16   # a shipped model -> file
    python -m training.weights new run.npz --filters 128 --latent-channels 192   # a new model -> file
    python -m training.weights photo:4 cw.npz --family channelwise   # a channelwise start point
    latentpack train --arch hyperprior ... --init-from run.npz   # file -> artifact
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import numpy as np

from pipeline.errors import LatentpackError

def named_variables(trainer) -> Dict[str, object]:
    """Every trainable weight of a trainer (a photo family's `training.loop.PhotoTrainer`) by name."""
    out = {}
    for part, model in trainer.parts.items():
        layers = getattr(model, "layers", None)
        if layers is None:  # a single layer: the density of the latents or side information
            for w in model.weights:
                out[f"{part}/{w.name}"] = w
            continue
        for layer in layers:
            for w in layer.weights:
                out[f"{part}/{layer.name}/{w.name}"] = w
    return out


def arrays(trainer) -> Dict[str, np.ndarray]:
    return {name: np.asarray(v.numpy(), np.float32) for name, v in named_variables(trainer).items()}


def save(trainer, path: str, history: Optional[dict] = None, step: Optional[int] = None) -> None:
    """Write the trainer's weights, its step and `history` to an .npz file (written whole, then renamed)."""
    write(path, arrays(trainer), int(trainer.step) if step is None else step, history or {})


def read(path: str) -> Tuple[Dict[str, np.ndarray], int, dict]:
    """(weights by name, step, history) of an .npz weights file."""
    try:
        with np.load(path, allow_pickle=False) as f:
            weights = {k: f[k] for k in f.files if k not in ("step", "history")}
            step = int(f["step"]) if "step" in f.files else 0
            history = json.loads(str(f["history"])) if "history" in f.files else {}
    except (OSError, ValueError, KeyError) as e:
        raise LatentpackError(f"{path}: not a weights file ({e})")
    return weights, step, history


def load(trainer, path: str, require_all: bool = True) -> Tuple[int, dict, list]:
    """Assign an .npz weights file to the trainer's variables; sets its step. Returns (step,
    history, names of the trainer's weights the file did not hold). Every weight of the file
    must exist in the trainer with the same shape; with `require_all`, every weight of the trainer
    must be in the file."""
    weights, step, history = read(path)
    missing = assign(trainer, weights, path, require_all)
    trainer.step.assign(step)
    return step, history, missing


def assign(trainer, weights: Dict[str, np.ndarray], path: str, require_all: bool = True) -> list:
    """Assign named arrays to the trainer's variables (`path`: where they came from, for errors);
    returns the names of the trainer's weights they did not hold."""
    variables = named_variables(trainer)
    unknown = sorted(set(weights) - set(variables))
    if unknown:
        raise LatentpackError(f"{path}: weights this model does not have: {', '.join(unknown[:5])}"
                              f"{' …' if len(unknown) > 5 else ''} (another --arch or size?)")
    missing = sorted(set(variables) - set(weights))
    if missing and require_all:
        raise LatentpackError(f"{path}: lacks weights of this model: {', '.join(missing[:5])}")
    for name, value in weights.items():
        v = variables[name]
        if tuple(v.shape) != value.shape:
            raise LatentpackError(f"{path}: {name} has shape {value.shape}, this model's is {tuple(v.shape)} "
                                  "(another --filters or --latent-channels?)")
        v.assign(value.astype(np.float32))
    return missing


# A stride-16 model's stages kept by `to_stride8` (new name <- old name): the analysis loses its
# last hidden stage, the synthesis its middle one; the hyper-transforms and the prior are kept.
STRIDE8_STAGES = {"analysis/conv0": "analysis/conv0", "analysis/gdn0": "analysis/gdn0",
                  "analysis/conv1": "analysis/conv1", "analysis/gdn1": "analysis/gdn1",
                  "analysis/conv2": "analysis/conv3",
                  "synthesis/deconv0": "synthesis/deconv0", "synthesis/igdn0": "synthesis/igdn0",
                  "synthesis/deconv1": "synthesis/deconv2", "synthesis/igdn1": "synthesis/igdn2",
                  "synthesis/deconv2": "synthesis/deconv3"}


def from_model(source: str, family: Optional[str] = None) -> Tuple[Dict[str, np.ndarray], dict]:
    """The weights of a model artifact (a folder, or a shipped name such as photo:4) as a trainer's
    named arrays, with a history naming where they came from. With `family` other than the
    artifact's own, the weights are turned into that family's start point by its trainer module's
    `start_from(weights, source_family)` (a channelwise model from a scale hyperprior computes the
    same at step 0)."""
    import families
    from pipeline import models

    model_dir = models.resolve(source)
    if not os.path.isfile(os.path.join(model_dir, "codec.json")):
        raise LatentpackError(f"{source}: not a model artifact (no codec.json), photo:<q>, new or a .npz")
    with open(os.path.join(model_dir, "codec.json")) as f:
        spec = json.load(f)
    own = spec.get("family", "dense")
    weights = families.family(own).weights_from_artifact(model_dir)
    history = {"from_artifact": source, "family": own, "fingerprint": spec.get("fingerprint"),
               "steps_before": spec.get("training", {}).get("steps_done", 0),
               "seconds_before": spec.get("training", {}).get("seconds", 0.0)}
    if family and family != own:
        convert = getattr(families.family(family).trainer_module(), "start_from", None)
        if convert is None:
            raise LatentpackError(f"{source}: a {own} model cannot start a {family} model")
        weights = convert(weights, own)
        history["as_family"] = family
    return weights, history


def to_stride8(weights: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """A start point for a stride-8 model (`train --stride 8`: four times the latents, the
    high-rate photo models) from a stride-16 model's weights: every layer whose shape the
    stride-8 model has, one stage fewer on each side (`STRIDE8_STAGES`). It does not compute
    what the stride-16 model did; a few thousand steps adapt it (models/README.md)."""
    if "analysis/conv3/kernel" not in weights or "analysis/conv4/kernel" in weights:
        raise LatentpackError("--stride 8 takes the weights of a stride-16 photo model (four stages)")
    out = {name: v for name, v in weights.items() if name.split("/")[0] not in ("analysis", "synthesis")}
    for new, old in STRIDE8_STAGES.items():
        out.update({new + name[len(old):]: v for name, v in weights.items() if name.startswith(old + "/")})
    return out


def write(path: str, weights: Dict[str, np.ndarray], step: int, history: dict) -> None:
    """An .npz weights file (written whole, then renamed)."""
    tmp = path + ".tmp.npz"
    np.savez(tmp, **weights, step=np.int64(step), history=np.array(json.dumps(history)))
    os.replace(tmp, path)


def main(argv=None) -> int:
    """python -m training.weights SOURCE OUT.npz: a weights file from a hyperprior artifact
    (a folder or photo:<q>), from `new` (a new model's initial weights, --filters and
    --latent-channels: to train one from scratch on a GPU), or from another weights file (a GPU
    run's output, to continue it), with --kernels float16 to halve what travels; --stride 8 turns
    a stride-16 model's weights into a stride-8 model's start point."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m training.weights", description=main.__doc__)
    p.add_argument("source", help="a hyperprior artifact, photo:<q>, new, or a weights file (.npz)")
    p.add_argument("out", help="the .npz to write")
    p.add_argument("--filters", type=int, default=64, help="new: channels of the hidden layers (N)")
    p.add_argument("--latent-channels", type=int, default=96, help="new: latent channels (M)")
    p.add_argument("--seed", type=int, default=0, help="new: random seed of the initial weights")
    p.add_argument("--family", default=None,
                   help="the photo model family of OUT (hyperprior, channelwise, spatial): for new, hyperprior "
                        "unless given; for an artifact, its own unless given (photo:4 --family channelwise: a "
                        "channelwise start point computing what photo:4 does)")
    p.add_argument("--kernels", choices=["float32", "float16"], default="float32",
                   help="how convolution kernels are stored in OUT (float16: half the bytes, for a start point "
                        "that must travel; GDN parameters and biases stay float32)")
    p.add_argument("--stride", type=int, choices=[8, 16], default=16,
                   help="8: the start point of a stride-8 model from a stride-16 model's weights (to_stride8)")
    args = p.parse_args(argv)
    if args.source == "new":
        import keras

        import families
        from training.config import PhotoConfig

        keras.utils.set_random_seed(args.seed)
        family = args.family or "hyperprior"
        trainer = families.family(family).trainer_module().TRAINER(PhotoConfig(
            filters=args.filters, latent_channels=args.latent_channels, family=family, seed=args.seed))
        weights, step = arrays(trainer), 0
        history = {"new": {"filters": args.filters, "latent_channels": args.latent_channels, "seed": args.seed}}
        what = f"new weights, N={args.filters} M={args.latent_channels}"
    elif args.source.endswith(".npz"):
        weights, step, history = read(args.source)
        what = f"weights of {args.source} at step {step}"
    else:
        weights, history = from_model(args.source, args.family)
        step = 0
        what = f"weights of {args.source} ({history['family']}{' as ' + args.family if args.family else ''})"
    if args.stride == 8:
        weights, step = to_stride8(weights), 0
        history = {"to_stride8": history}
        what += ", as a stride-8 start point"
    if args.kernels == "float16":
        weights = {k: v.astype(np.float16) if k.endswith("/kernel") else v for k, v in weights.items()}
    write(args.out, weights, step, history)
    print(f"{args.out}: {len(weights)} {what}, kernels {args.kernels}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from pipeline.errors import guarded

    raise SystemExit(guarded(main)())
