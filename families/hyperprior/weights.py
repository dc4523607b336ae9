"""A hyperprior artifact's weights recovered as a trainer's named arrays (`training.weights`):
how a shipped model becomes the start of a new run when its checkpoints are gone."""
from __future__ import annotations

import json
import os
from typing import Dict

import numpy as np

from pipeline.errors import LatentpackError


def _gdn_stored(param: np.ndarray) -> np.ndarray:
    """GDN's beta or gamma (the effective parameter) as `families.spatial.layers.GDN` stores it."""
    from families.spatial.layers import _PEDESTAL

    return np.sqrt(np.maximum(np.asarray(param, np.float64), 0.0) + _PEDESTAL).astype(np.float32)


def from_artifact(model_dir: str) -> Dict[str, np.ndarray]:
    """The weights of a hyperprior artifact (a shipped model) as a trainer's named arrays. Kernels
    are the stored ones dequantized. The side information's density, which the artifact holds only
    as frozen integer tables, is fitted back to those tables (`prior_from_tables`). The hyper-synthesis is the float network
    equivalent to the stored integer one: ReLU commutes with positive scaling, so spreading each
    layer's power-of-two scale differently gives the same output; the last layer's scale follows
    from the integer index mapping."""
    import tensorflow as tf

    from families.hyperprior.train import LOG_SCALE_STEP

    with open(os.path.join(model_dir, "codec.json")) as f:
        spec = json.load(f)
    if spec.get("family") != "hyperprior":
        raise LatentpackError(f"{model_dir}: not a hyperprior model (family {spec.get('family')!r})")
    module = tf.saved_model.load(model_dir)
    out: Dict[str, np.ndarray] = {}

    def kernel(k, scale):
        k = np.asarray(k.numpy(), np.float32)
        return k if scale is None else k * np.asarray(scale.numpy(), np.float32)

    for part, prefix in (("analysis", ("conv", "gdn")), ("synthesis", ("deconv", "igdn"))):
        conv = gdn = 0
        for layer in getattr(module, part):
            a, b = layer[1], layer[2]
            if len(a.shape) == 1:  # GDN: beta, gamma
                out[f"{part}/{prefix[1]}{gdn}/beta"] = _gdn_stored(a.numpy())
                out[f"{part}/{prefix[1]}{gdn}/gamma"] = _gdn_stored(b.numpy())
                gdn += 1
            else:
                out[f"{part}/{prefix[0]}{conv}/kernel"] = kernel(a, layer[4] if len(layer) > 4 else None)
                out[f"{part}/{prefix[0]}{conv}/bias"] = np.asarray(b.numpy(), np.float32)
                conv += 1
    for i, (k, scale, b) in enumerate(module.hyper_analysis):
        out[f"hyper_analysis/hconv{i}/kernel"] = kernel(k, scale)
        out[f"hyper_analysis/hconv{i}/bias"] = np.asarray(b.numpy(), np.float32)
    layers = spec["entropy_model"]["hyper_synthesis"]
    kernels = [np.asarray(k.numpy(), np.float64) for k in module.hyper_kernels]
    biases = [np.asarray(b.numpy(), np.float64) for b in module.hyper_biases]
    last_bits = int(round(np.log2(layers[-1]["index_step"] / LOG_SCALE_STEP)))  # fractional bits of the last accumulator
    frac = 0  # fractional bits of the current layer's input
    for i, (layer, k, b) in enumerate(zip(layers, kernels, biases)):
        if i < len(layers) - 1:  # hidden: any split of the scale will do; keep the kernel near 1
            wbits = int(round(np.log2(max(np.abs(k).max(), 1.0))))
            acc = frac + wbits
            next_frac = acc - layer["shift"]
        else:
            acc = last_bits
            wbits = acc - frac
        out[f"hyper_synthesis/hdeconv{i}/kernel"] = (k / 2.0 ** wbits).astype(np.float32)
        out[f"hyper_synthesis/hdeconv{i}/bias"] = (b / 2.0 ** acc).astype(np.float32)
        if i < len(layers) - 1:
            frac = next_frac
    out.update(prior_from_tables(spec["entropy_model"]["hyper"]))
    return out


def prior_from_tables(tables: dict) -> Dict[str, np.ndarray]:
    """The side information's density (`prior/...` arrays of a `DeepFactorizedPrior`) fitted to the
    integer tables it was frozen into. Without it a run from an artifact started with a fresh
    density and gave every image its side information's bits again: +31% bits on CIFAR-10 at step
    1 from photo:4 (models/README.md). Deterministic: the same tables give the same arrays."""
    from pipeline.errors import log
    from training.prior import DeepFactorizedPrior, fit_to_tables

    prior = DeepFactorizedPrior(len(tables["offsets"]), name="prior")
    gap = fit_to_tables(prior, tables)
    log.info("the side information's density recovered from its tables (%.4f bits per symbol from them)", gap)
    return {f"prior/{w.name}": np.asarray(w.numpy(), np.float32) for w in prior.weights}
