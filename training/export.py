"""Writing a model artifact, for every family: staged into place whole, codec.json with its
fingerprint, and the photo families' SavedModel, curves and held-out figures."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil

from pipeline.artifact import CODEC_FILE, FORMAT, compute_fingerprint, validate_spec


def recover(model_dir: str, replaced: str = ".replaced") -> None:
    """Put back the artifact a `staged` swap had moved aside when it stopped between its renames."""
    base = model_dir.rstrip("/")
    if not os.path.exists(base) and os.path.isdir(base + replaced):
        os.replace(base + replaced, base)


@contextlib.contextmanager
def staged(model_dir: str, partial: str = ".partial", replaced: str = ".replaced"):
    """Write an artifact whole into `<model_dir><partial>` and swap it in by two renames when the
    block ends without error: an export that is interrupted or fails leaves the earlier artifact
    (or nothing) at `model_dir`, never a mix of two. Should a run stop between the renames, the
    earlier artifact waits at `<model_dir><replaced>`, and the next call puts it back first."""
    base = model_dir.rstrip("/")
    tmp, old = base + partial, base + replaced
    recover(base, replaced)
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(base):
        os.replace(base, old)
    os.replace(tmp, base)
    shutil.rmtree(old, ignore_errors=True)


def write_codec_json(model_dir: str, spec: dict) -> dict:
    """Write codec.json beside a saved model, with the fingerprint of the whole directory; the
    spec is validated exactly as the pipeline will read it. Returns the final dict."""
    import families

    # Its family's format, so that older readers refuse only what they cannot read.
    version = families.family(spec.get("family", "dense")).format_version
    spec = dict(spec, format=FORMAT, format_version=version, fingerprint="sha256:pending")
    codec_path = os.path.join(model_dir, CODEC_FILE)
    with open(codec_path, "w") as f:
        f.write(readable_json(spec))
    spec["fingerprint"] = compute_fingerprint(model_dir)
    validate_spec(spec, codec_path)
    with open(codec_path, "w") as f:
        f.write(readable_json(spec))
    return spec


def readable_json(value) -> str:
    """JSON indented for reading, with lists of numbers (entropy tables) on one line each: a
    channelwise model's 512 tables take 0.28 MB instead of 1.2 MB one number per line. (The
    fingerprint reads the parsed JSON, so the layout never changes it.)"""
    import re

    text = json.dumps(value, indent=2)
    return re.sub(r"\[\s+([-+.\deE,\s]+?)\s+\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)


def artifact_spec(trainer, family: str, prior: str, entropy_model: dict, history: dict,
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

    from training.curves import save_curves

    os.makedirs(model_dir, exist_ok=True)
    save_curves(history, os.path.join(model_dir, "loss.png"))
    with open(os.path.join(model_dir, "history.json"), "w") as f:
        json.dump(history, f)
    tf.saved_model.save(module, model_dir, signatures={name: getattr(module, name) for name in signatures})


def write_photo_artifact(model_dir: str, module, signatures, spec: dict, history: dict, holdout) -> dict:
    """A photo family's artifact: the SavedModel, then codec.json, then the held-out figures
    measured through the pipeline's own codec (real codes) written into it."""
    from training.measure import measure_codec

    save_artifact(model_dir, module, signatures, history)
    write_codec_json(model_dir, spec)
    spec = dict(spec, metrics=measure_codec(model_dir, holdout))
    return write_codec_json(model_dir, spec)
