"""The pipeline's side of a model artifact: what every family's codec provides (the columns it
stores, compress and decompress), and loading one.

    from pipeline.codec import load_codec
    codec = load_codec(model_dir, spec)          # once per worker, in DoFn.setup()
    columns = codec.compress(batch, "code")      # ImageBatch -> the dataset's value columns
    for item in codec.decompress(table): ...     # Arrow rows -> ImageBatch (or DeadLetter per bad row)

The jobs, writers, accounting and incremental mode only ever call this pair; quantizers,
entropy tables and latent shapes stay inside the family's codec (`families/<name>/codec.py`),
which `codec_class` finds through the family registry (`families`).
"""
from __future__ import annotations

import threading
from typing import Dict, Iterator, List, Optional, Tuple, Type, Union

import numpy as np
import pyarrow as pa

from pipeline.errors import LatentpackError
from pipeline.images import DEFAULT_MAX_PIXELS, DeadLetter, ImageBatch

from pipeline.latents import LATENT_FORMATS


class ModelCodec:
    """A loaded model artifact. Each family's subclass implements the four methods below.

    `compress(batch, latent_format, refine)` returns the dataset's value columns for a batch of
    same-shaped images (name -> Arrow array, in `fields` order); `decompress(table)` turns
    rows back into ImageBatches of same-shaped images, and a row whose value cannot be
    decoded into a DeadLetter, never an exception.
    """

    def __init__(self, model_dir: str, spec):
        import tensorflow as tf

        self.model_dir, self.spec, self.fingerprint = model_dir, spec, spec.fingerprint
        # TensorFlow's own loader: no pickle, no Keras deserialization of Python code.
        self._model = tf.saved_model.load(model_dir)
        try:
            self._encode = self._model.signatures["encode"]
            self._decode = self._model.signatures["decode"]
        except KeyError as e:
            raise LatentpackError(f"{model_dir}: the SavedModel has no {e} signature") from None
        self.check_signatures()

    def check_signatures(self) -> None:
        """Refuse an artifact whose codec.json disagrees with its own SavedModel (e.g. an edited
        latent size with the fingerprint recomputed): better one clear error than a TensorFlow
        traceback in the middle of a job."""

    def _signature_shapes(self):
        """(encode's input shape, encode's output shape, decode's input shape) as lists (None: any)."""
        enc_in = self._encode.structured_input_signature[1]["images"].shape.as_list()
        enc_out = self._encode.structured_outputs["latent"].shape.as_list()
        dec_in = self._decode.structured_input_signature[1]["latent"].shape.as_list()
        return enc_in, enc_out, dec_in

    # --- what the dataset stores -------------------------------------------------------------
    @classmethod
    def fields(cls, spec, latent_format: str) -> List[pa.Field]:
        """The per-row columns this family writes (besides `key` and `label`)."""
        raise NotImplementedError

    @classmethod
    def default_latent_format(cls, spec) -> str:
        return "code" if spec.entropy_coded else "int"

    @classmethod
    def check_latent_format(cls, spec, latent_format: str) -> Optional[str]:
        """None if the model can write/read `latent_format`, else why not."""
        if latent_format not in LATENT_FORMATS:
            return f"unknown latent format {latent_format!r}"
        if latent_format == "code" and not spec.entropy_coded:
            return "--latent-format code needs a model trained with --quality or --lambda (it has no entropy model)"
        return None

    @classmethod
    def check_refine(cls, spec) -> Optional[str]:
        """None if encoding with this model can refine its latents (`pipeline/refine.py`), else why not."""
        return f"--refine is not available for {spec.family} models"

    def missing_refinement(self) -> Optional[str]:
        """None if this loaded artifact can refine its latents, else why not."""
        return self.check_refine(self.spec)

    @classmethod
    def image_shape(cls, spec) -> Optional[Tuple[int, int, int]]:
        """The one (H, W, C) the model takes, or None when it takes any size."""
        return None

    @classmethod
    def metadata(cls, spec) -> dict:
        """Codec facts recorded in each Parquet part's schema metadata."""
        return {"family": spec.family, "arch": spec.arch}

    # --- the pair the jobs call ----------------------------------------------------------------
    def compress(self, batch: ImageBatch, latent_format: str, refine: int = 0) -> dict:
        """`refine`: steps of encoder-side latent refinement (0: the encoder's latents as they are)."""
        raise NotImplementedError

    def decompress(self, table, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Union[ImageBatch, DeadLetter]]:
        """Rows -> ImageBatches, or a DeadLetter per row that cannot be decoded. `max_pixels`: a row
        that claims a larger image is a `too_many_pixels` dead letter, not decoded (a few bytes of
        code can claim gigapixels)."""
        raise NotImplementedError


def code_words(table) -> str:
    """How the codes of a table read from a dataset part lay out their bytes (`entropy.words_for`
    its format version); a table without latentpack metadata is this version's (codes just made)."""
    from pipeline import entropy, latents

    try:
        version = latents.metadata_of(table.schema).get("format_version", 1)
    except (LatentpackError, ValueError, AttributeError):  # no (readable) metadata: codes just made
        version = latents.FORMAT_VERSION
    return entropy.words_for(version if isinstance(version, int) else latents.FORMAT_VERSION)


def row_labels(table) -> Tuple[np.ndarray, np.ndarray]:
    """(labels with -1 where null, has_label) of a table or record batch."""
    label = table.column("label")
    return label.fill_null(-1).to_numpy().astype(np.int64), label.is_valid().to_numpy(zero_copy_only=False)


def schema_of(spec, latent_format: str = "int", extra=(), held=None):
    """The Parquet schema of a dataset made with the model of `spec`: its family's columns and
    facts (`pipeline.latents.schema`), and the source's other columns (`extra`, pyarrow fields;
    only those named in `held`, if given)."""
    from pipeline import latents

    family = codec_class(spec)
    return latents.schema(family.fields(spec, latent_format), family.metadata(spec), spec.fingerprint, latent_format,
                          extra, held)


def codec_class(spec) -> Type[ModelCodec]:
    """The codec class of an artifact's family (families/<name>/codec.py)."""
    import families

    return families.family(spec.family).codec_class()


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
