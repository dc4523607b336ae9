"""Model families: one codec class per family, chosen by `codec.json`'s `family` through a registry.

    from pipeline.codecs import load_codec
    codec = load_codec(model_dir, spec)          # once per worker, in DoFn.setup()
    columns = codec.compress(batch, "code")      # ImageBatch -> the dataset's value columns
    for item in codec.decompress(table): ...     # Arrow rows -> ImageBatch (or DeadLetter per bad row)

The jobs, writers, accounting and incremental mode only ever call this pair; quantizers,
entropy tables and latent shapes stay inside the family's module (`dense.py`, `spatial.py`).
"""
from __future__ import annotations

import threading
from typing import Dict, Type

from pipeline.codecs.base import ModelCodec
from pipeline.errors import LatentpackError

CODECS: Dict[str, Type[ModelCodec]] = {}


def register(cls):
    CODECS[cls.family] = cls
    return cls


def codec_class(spec) -> Type[ModelCodec]:
    try:
        return CODECS[spec.family]
    except KeyError:
        raise LatentpackError(f"model family {spec.family!r} is not known to this latentpack") from None


def load_codec(model_dir: str, spec=None) -> ModelCodec:
    """The artifact at `model_dir` as a loaded codec (spec read and verified if not given)."""
    from pipeline.artifact import read_spec

    spec = spec if spec is not None else read_spec(model_dir)
    return codec_class(spec)(model_dir, spec)


_SHARED: Dict[tuple, ModelCodec] = {}
_SHARED_LOCK = threading.Lock()


def shared_codec(model_dir: str, spec) -> ModelCodec:
    """`load_codec`, once per worker process: runners that set up a DoFn per task or bundle (Dask
    does, per partition) reuse the model already in memory instead of loading it again. A loaded
    codec is read-only, so the threads of one worker may share it."""
    key = (model_dir, spec.fingerprint)
    with _SHARED_LOCK:
        if key not in _SHARED:
            if len(_SHARED) >= 2:  # a worker rarely needs more than one model at a time
                _SHARED.pop(next(iter(_SHARED)))
            _SHARED[key] = load_codec(model_dir, spec)
        return _SHARED[key]


from pipeline.codecs import channelwise, dense, hyperprior, spatial  # noqa: E402,F401  (registers the families)
