"""The hyperprior family: the spatial codec plus a scale hyperprior (Ballé et al. 2018).

Same rows, sizes, padding and tiling as the spatial family (`spatial.py`); only the code
differs. Per image: side information z (the hyper-analysis of the latents, [ceil(h/4),
ceil(w/4), N]) coded with per-channel integer tables, then every latent coded with the
Gaussian table whose index the hyper-synthesis predicts from z, all in one byte string.

Determinism policy: the decoder must choose exactly the tables the encoder chose, on any
machine. The hyper-synthesis that chooses them is an integer network
(`IntegerHyperSynthesis`): integer kernels (|k| <= 2**12), integer activations (<= 2**16,
rounded down after each layer by a right shift), and the table index is an integer
division of the last layer's integer output. It is evaluated with float64 matrix products
whose operands, products and partial sums are all integers below 2**53, hence exact in any
summation order, thread count or BLAS; the bounds are checked when a model is loaded. The
image transforms stay in float32 TensorFlow: they decide pixels, never which table is used.
"""
from __future__ import annotations

from typing import List, Tuple

import constriction
import numpy as np

from families.spatial.codec import SpatialCodec
from pipeline.entropy import BIG, ChannelCoder, CheckedReader, finish
from pipeline.errors import LatentpackError
from pipeline.integer import one_blas_thread

EXACT = 2.0 ** 53
WEIGHT_LIMIT, ACTIVATION_LIMIT = 2 ** 12, 2 ** 16 - 1
# The integer hyper-synthesis runs on strips of about this many latent positions, MARGIN rows of z
# either side (IntegerHyperSynthesis.__call__).
STRIP_POSITIONS, MARGIN = 1 << 16, 3


def entropy_model_spec(z_tables: dict, gaussian: dict, integer: dict) -> dict:
    """codec.json's entropy_model of a hyperprior artifact (integer kernels live in the SavedModel)."""
    layers = [{k: v for k, v in layer.items() if k not in ("kernel", "bias")} | {
        "kernel_shape": list(layer["kernel"].shape)} for layer in integer["layers"]]
    return {"kind": "scale-hyperprior", "precision": z_tables["precision"],
            "hyper": {"precision": z_tables["precision"], "offsets": z_tables["offsets"],
                      "frequencies": z_tables["frequencies"]},
            "gaussian": gaussian, "hyper_synthesis": layers}


class IntegerHyperSynthesis:
    """z (integers [h, w, N]) -> Gaussian table index of every latent ([4h, 4w, M]), exactly.

    Layers are transposed convolutions ("same" padding, as Keras' Conv2DTranspose): output
    position s*i + k - (K - s)//2 receives input i times kernel tap k."""

    def __init__(self, layers: List[dict], kernels: List[np.ndarray], biases: List[np.ndarray], levels: int):
        self.layers, self.levels = layers, levels
        self.kernels = [np.asarray(k, np.float64) for k in kernels]
        self.biases = [np.asarray(b, np.int64) for b in biases]
        peak = 2 ** 15  # |z| is clipped to this before the first layer
        for layer, kernel, bias in zip(layers, self.kernels, self.biases):
            taps = kernel.shape[0] * kernel.shape[1] * kernel.shape[3]
            if np.abs(kernel).max() > WEIGHT_LIMIT or taps * WEIGHT_LIMIT * max(peak, ACTIVATION_LIMIT) + \
                    np.abs(bias).max() >= EXACT:
                raise LatentpackError("hyper-synthesis weights exceed the exact integer range")
            if kernel.shape[0] != kernel.shape[1] or layer["stride"] not in (1, 2):
                raise LatentpackError("hyper-synthesis layers must be square, stride 1 or 2")
            if "shift" in layer and not 0 <= layer["shift"] < 62:
                raise LatentpackError("hyper-synthesis shift out of range")
            peak = ACTIVATION_LIMIT
        last = layers[-1]
        if not (isinstance(last.get("index_step"), int) and last["index_step"] > 0
                and isinstance(last.get("index_offset"), int)):
            raise LatentpackError("hyper-synthesis has no integer index mapping")

    @staticmethod
    def _transpose_conv(x: np.ndarray, kernel: np.ndarray, stride: int) -> np.ndarray:
        """x [h, w, Cin] (integer-valued float64), kernel [K, K, Cout, Cin] -> [s*h, s*w, Cout]."""
        h, w, cin = x.shape
        size, cout = kernel.shape[0], kernel.shape[2]
        before = (size - stride) // 2
        out = np.zeros((stride * h + size, stride * w + size, cout))
        flat = x.reshape(-1, cin)
        for ky in range(size):
            for kx in range(size):
                contribution = (flat @ kernel[ky, kx].T).reshape(h, w, cout)
                out[ky:ky + stride * h:stride, kx:kx + stride * w:stride] += contribution
        return out[before:before + stride * h, before:before + stride * w]

    def __call__(self, z: np.ndarray) -> np.ndarray:
        """Table indexes [4h, 4w, M] (int16) of side information z [h, w, N]; large grids in strips
        of z rows, each with MARGIN rows of context either side. Every layer's output row depends
        on input rows at most 2 away (`_transpose_conv`), so a strip's inner rows are exactly the
        whole grid's: integers, in any order of summation. Bounds the float64 work arrays for a
        stride-8 model's latent grid of a 24-megapixel photo (750x500x96) to about STRIP_POSITIONS
        positions at a time. BLAS runs on one thread here (`pipeline.integer.one_blas_thread`)."""
        with one_blas_thread():
            return self._strips(z)

    def _strips(self, z: np.ndarray) -> np.ndarray:
        h, w = z.shape[:2]
        rows = max(1, STRIP_POSITIONS // (16 * max(w, 1)))
        if h <= rows:
            return self._indexes(z)
        out = np.empty((4 * h, 4 * w, self.kernels[-1].shape[2]), np.int16)
        for a in range(0, h, rows):
            b = min(h, a + rows)
            lo, hi = max(0, a - MARGIN), min(h, b + MARGIN)
            out[4 * a:4 * b] = self._indexes(z[lo:hi])[4 * (a - lo):4 * (b - lo)]
        return out

    def _indexes(self, z: np.ndarray) -> np.ndarray:
        x = np.clip(np.asarray(z, np.float64), -2 ** 15, 2 ** 15)
        for layer, kernel, bias in zip(self.layers, self.kernels, self.biases):
            acc = self._transpose_conv(x, kernel, layer["stride"]).astype(np.int64) + bias
            if layer.get("relu"):
                acc = np.maximum(acc, 0)
            if "shift" in layer:
                x = np.minimum(acc >> layer["shift"], ACTIVATION_LIMIT).astype(np.float64)
        index = (acc - layer["index_offset"]) // layer["index_step"]
        return np.clip(index, 0, self.levels - 1).astype(np.int16)


class HyperCoder:
    """Latents [h, w, M] with their side information z <-> one byte string: z channel by channel
    with its own tables, then the latents grouped by the Gaussian table chosen for each."""

    def __init__(self, model: dict, kernels, biases):
        self.side = ChannelCoder(model["hyper"])
        self.tables = ChannelCoder(model["gaussian"])  # table j: the symbols -R_j .. R_j
        self.radius = -self.tables.offsets
        self.max_radius = int(self.radius.max())
        self.synthesis = IntegerHyperSynthesis([dict(layer) for layer in model["hyper_synthesis"]],
                                               kernels, biases, len(self.radius))

    def side_information(self, z: np.ndarray, grid: Tuple[int, int]) -> np.ndarray:
        """z as the decoder will have it: cropped to the latent grid's quarter, clipped to its tables."""
        z = z[:-(-grid[0] // 4), :-(-grid[1] // 4)]
        return self.side.symbols(z) + self.side.offsets

    def indexes(self, z: np.ndarray, grid: Tuple[int, int]) -> np.ndarray:
        return self.synthesis(z)[:grid[0], :grid[1]]

    def clip(self, y: np.ndarray, index: np.ndarray) -> np.ndarray:
        """y [h, w, M] clipped to the tables `index` chooses (int16): what a code holds."""
        held = np.empty(y.size, np.int16)
        for _, chosen, values in self._by_table(y, index):
            held[chosen] = values
        return held.reshape(y.shape)

    def clipped(self, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """The latents a code of (y, z) holds, without coding them: y clipped to its tables."""
        grid = y.shape[:2]
        return self.clip(y, self.indexes(self.side_information(z, grid), grid))

    def _groups(self, index: np.ndarray):
        """(table, flat positions in raster order) for each table in use, in table order (one
        table at a time: no sort of every position, whose int64 order would be 8 bytes each)."""
        flat = index.reshape(-1)
        for j in np.flatnonzero(np.bincount(flat, minlength=len(self.radius))):
            yield int(j), np.flatnonzero(flat == j)

    def _by_table(self, y: np.ndarray, index: np.ndarray):
        """(table, flat positions, y's values there clipped to the table, int32) per table in use."""
        flat = y.reshape(-1)
        for j, chosen in self._groups(index):
            r = int(self.radius[j])
            yield j, chosen, np.clip(flat[chosen].astype(np.int32), -r, r)

    def encode(self, y: np.ndarray, z: np.ndarray) -> Tuple[bytes, np.ndarray]:
        """(code, the latents it holds: y clipped to its tables)."""
        grid = y.shape[:2]
        z_hat = self.side_information(z, grid)
        index = self.indexes(z_hat, grid)
        coder = constriction.stream.queue.RangeEncoder()
        self.side.write(coder, z_hat)
        held = np.empty(y.size, np.int16)
        for j, chosen, values in self._by_table(y, index):
            held[chosen] = values
            coder.encode(values + int(self.radius[j]), self.tables.models[j])
        return finish(coder), held.reshape(y.shape)

    def decode(self, code: bytes, height: int, width: int, words: str = BIG) -> np.ndarray:
        """One code -> latents [height, width, M] (int16; height, width: the latent grid)."""
        coder = CheckedReader(code, words)
        z_hat = self.side.read(coder, -(-height // 4), -(-width // 4))
        index = self.indexes(z_hat, (height, width))
        out = np.zeros(index.size, np.int16)
        for j, chosen in self._groups(index):
            out[chosen] = coder.decode(self.tables.models[j], len(chosen)) - int(self.radius[j])
        coder.verify()
        return out.reshape(index.shape)


class HyperpriorCodec(SpatialCodec):

    def make_coder(self):
        try:
            self._hyper_encode = self._model.signatures["hyper_encode"]
            kernels = [k.numpy() for k in self._model.hyper_kernels]
            biases = [b.numpy() for b in self._model.hyper_biases]
        except (KeyError, AttributeError) as e:
            raise LatentpackError(f"{self.model_dir}: the SavedModel lacks the hyperprior ({e})") from None
        layers = self.spec.entropy_model["hyper_synthesis"]
        if len(kernels) != len(layers) or any(list(k.shape) != list(layer["kernel_shape"])
                                              for k, layer in zip(kernels, layers)):
            raise LatentpackError(f"{self.model_dir}: codec.json's hyper-synthesis does not match its SavedModel")
        return HyperCoder(self.spec.entropy_model, kernels, biases)

    def latent_values(self, latent: np.ndarray, latent_format: str) -> list:
        """Codes (or the clipped latents, for the int format) of a batch of same-shaped latents."""
        z = self._hyper_encode(latent=np.ascontiguousarray(latent, np.int16))["hyper"].numpy()
        if latent_format == "code":
            return [self.coder.encode(y, side)[0] for y, side in zip(latent, z)]
        return [self.coder.clipped(y, side).reshape(-1) for y, side in zip(latent, z)]

    def out_of_tables(self, latent: np.ndarray) -> bool:
        return bool((np.abs(latent) > self.coder.max_radius).any())

    def rate_tables(self) -> dict:
        return self.spec.entropy_model["gaussian"]

    def latent_tables(self, latent: np.ndarray) -> np.ndarray:
        """The Gaussian table of each latent of a batch, as the side information of those latents
        chooses it: the table the code will use."""
        z = self._hyper_encode(latent=np.ascontiguousarray(latent, np.int16))["hyper"].numpy()
        grid = latent.shape[1:3]
        return np.stack([self.coder.indexes(self.coder.side_information(side, grid), grid) for side in z])

