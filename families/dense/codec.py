"""The dense family (format 1's only one): a fixed image shape, one latent vector per image.

Columns: `code` (binary, entropy-coded with the frozen factorized prior) or `latent`
(fixed-size list of int8/int16). The quantizer is baked into the SavedModel signatures.
"""
from __future__ import annotations

import functools
from typing import List

import numpy as np
import pyarrow as pa

from pipeline.codec import ModelCodec, code_words, row_labels
from pipeline.entropy import EntropyCoder
from pipeline.errors import LatentpackError
from pipeline.images import DEFAULT_MAX_PIXELS, DeadLetter, ImageBatch

DTYPES = {"int8": (np.int8, pa.int8()), "int16": (np.int16, pa.int16())}
# A row group can hold many thousands of rows: decode it in slices of bounded memory.
DECODE_ROWS = 1024


class DenseCodec(ModelCodec):

    def __init__(self, model_dir, spec):
        super().__init__(model_dir, spec)
        self.entropy = EntropyCoder(spec.entropy_model) if spec.entropy_coded else None
        self.latent_dtype = DTYPES[spec.latent_dtype][0]
        self.low = np.asarray(spec.quantization["min"], np.int64)
        self.high = np.asarray(spec.quantization["max"], np.int64)

    @functools.cached_property
    def refiner(self):
        """The encode-time latent search (`pipeline/refine.py`), built on first use (decode jobs never
        need it); None when this artifact cannot refine (`missing_refinement` says why)."""
        if self.missing_refinement() is not None:
            return None
        from pipeline.refine import Refiner

        signatures = self._model.signatures
        return Refiner(signatures["analyze"], signatures["synthesize"], self.entropy, self.low, self.high,
                       self.spec.training["lmbda"], int(np.prod(self.spec.image_shape)))

    def _refinement_signatures(self) -> bool:
        """Whether the SavedModel has `analyze` and `synthesize` of this model's shapes."""
        signatures = self._model.signatures
        if "analyze" not in signatures or "synthesize" not in signatures:
            return False
        try:
            analyze_in = signatures["analyze"].structured_input_signature[1]["images"].shape.as_list()
            analyze_out = signatures["analyze"].structured_outputs["latent"].shape.as_list()
            synthesize_in = signatures["synthesize"].structured_input_signature[1]["latent"].shape.as_list()
            synthesize_out = signatures["synthesize"].structured_outputs["image"].shape.as_list()
        except (KeyError, AttributeError, TypeError, ValueError):
            return False
        return (analyze_in[1:] == list(self.spec.image_shape) and analyze_out[-1:] == [self.spec.latent_dim]
                and synthesize_in[-1:] == [self.spec.latent_dim]
                and synthesize_out[1:] == list(self.spec.image_shape))

    def check_signatures(self):
        enc_in, enc_out, dec_in = self._signature_shapes()
        spec = self.spec
        if enc_in[1:] != list(spec.image_shape) or enc_out[-1] != spec.latent_dim or dec_in[-1] != spec.latent_dim:
            raise LatentpackError(
                f"{self.model_dir}: codec.json (images {list(spec.image_shape)}, {spec.latent_dim} latents) does not "
                f"match its SavedModel (images {enc_in[1:]}, {enc_out[-1]} latents); the artifact was altered")

    @classmethod
    def fields(cls, spec, latent_format) -> List[pa.Field]:
        if latent_format == "code":
            return [pa.field("code", pa.binary(), nullable=False)]
        return [pa.field("latent", pa.list_(DTYPES[spec.latent_dtype][1], spec.latent_dim), nullable=False)]

    @classmethod
    def image_shape(cls, spec):
        return tuple(spec.image_shape)

    @classmethod
    def check_refine(cls, spec):
        if not spec.entropy_coded or not isinstance(spec.training.get("lmbda"), (int, float)):
            return "--refine needs a model trained with --quality or --lambda (it refines against its rate)"
        if spec.quantization.get("kind") != "integer":
            return "--refine needs a model whose latents are rounded to integers (an entropy-coded dense model)"
        return None

    def missing_refinement(self):
        """None if this artifact can refine, else why not (it was exported without the signatures)."""
        why = self.check_refine(self.spec)
        if why is None and not self._refinement_signatures():
            why = (f"--refine needs the analyze and synthesize signatures of this model's shapes, which "
                   f"{self.model_dir} was exported without (latentpack < 0.4); families.dense.export.add_refinement_to "
                   "re-exports it with them (README: Refinement)")
        return why

    @classmethod
    def metadata(cls, spec):
        return dict(super().metadata(spec), image_shape=list(spec.image_shape), latent_dim=spec.latent_dim,
                    latent_dtype=spec.latent_dtype, quantization_bits=spec.quantization["bits"])

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N,H,W,C] -> integer latents [N,D]."""
        if len(images) == 0:
            return np.zeros((0, self.spec.latent_dim), self.latent_dtype)
        return self._encode(images=images)["latent"].numpy()

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """integer latents [N,D] -> uint8 [N,H,W,C]."""
        if len(latents) == 0:
            return np.zeros((0,) + tuple(self.spec.image_shape), np.uint8)
        return self._decode(latent=np.asarray(latents, self.latent_dtype))["image"].numpy()

    def compress(self, batch, latent_format, refine=0):
        if refine and len(batch.images):
            latent = self.refiner(batch.images, refine).astype(self.latent_dtype)
        else:
            latent = self.encode(batch.images)
        if latent_format == "code":
            return {"code": pa.array(self.entropy.encode(latent), pa.binary())}
        flat = pa.array(np.ascontiguousarray(latent).reshape(-1))
        return {"latent": pa.FixedSizeListArray.from_arrays(flat, latent.shape[1])}

    def decompress(self, table, max_pixels=DEFAULT_MAX_PIXELS):  # the model fixes every image's size
        for start in range(0, table.num_rows, DECODE_ROWS):
            part = table.slice(start, DECODE_ROWS)
            keys = part.column("key").to_pylist()
            labels, has_label = row_labels(part)
            latent, ok, why = self._latents(part, keys)
            for i in np.nonzero(~ok)[0]:
                yield DeadLetter(keys[i], "", start + int(i), *why[i])
            rows = np.nonzero(ok)[0]
            if len(rows):
                images = self.decode(latent[rows])
                yield ImageBatch([keys[i] for i in rows], images, labels[rows], has_label[rows])

    def _latents(self, part, keys):
        """(latents [N, D], ok [N], why); a row that does not decode gets ok False and a reason in `why`
        (no state kept on the codec: the threads of a worker share it)."""
        n, dim = part.num_rows, self.spec.latent_dim
        latent = np.zeros((n, dim), np.int64)
        ok = np.ones(n, bool)
        why = {}
        if "code" in part.column_names:
            words = code_words(part)
            for i, code in enumerate(part.column("code").to_pylist()):
                try:
                    latent[i] = self.entropy.decode([code], words)[0]
                except Exception as e:  # constriction reports a bad stream in several ways
                    ok[i], why[i] = False, ("bad_code", f"entropy code does not decode: {e}")
        else:
            column = part.column("latent")
            column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
            latent = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.int64)
        out_of_range = ok & ((latent < self.low) | (latent > self.high)).any(axis=1)
        for i in np.nonzero(out_of_range)[0]:
            ok[i], why[i] = False, ("bad_latent", "latent values outside the model's quantizer range")
        return latent, ok, why
