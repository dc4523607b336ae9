"""The channelwise family: the spatial codec with a channel-conditional mean-scale entropy model
(Minnen & Singh 2020).

Same rows, sizes, padding and tiling as the spatial family (`spatial.py`); only the code
differs. Per image: side information z (the hyper-analysis of the latents, [ceil(h/4),
ceil(w/4), N]) coded with per-channel integer tables; then the latent channels slice by slice,
each latent with the Gaussian table of its predicted scale and the fraction of its predicted
mean, centred on the mean rounded, all in one byte string. The predictions of slice i come from
the hyper-synthesis of z and the slices before i.

Determinism policy: both predictions are integer networks (`pipeline.integer.IntegerNetwork`,
exact on every machine), and the table of a latent follows from their integer outputs by
integer arithmetic: the mean's accumulator becomes a multiple of 1/MEAN_LEVELS (`_centres`), the
scale's a table index by integer division (as the hyperprior family's). The latents themselves
stay integers, so the decoder's input is exactly the encoder's.
"""
from __future__ import annotations

from typing import List, Tuple

import constriction
import numpy as np

from families.spatial.codec import SpatialCodec
from pipeline.entropy import BIG, ChannelCoder, CheckedReader, finish
from pipeline.errors import LatentpackError
from pipeline.integer import ACTIVATION_LIMIT, IntegerNetwork

LATENT_LIMIT = 2 ** 15  # latents are int16: what an integer network may be given of them


def _at_bits(values: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Integers times 2**shift per channel (shift < 0: divided, rounded down), exactly."""
    return np.where(shift >= 0, values << np.maximum(shift, 0), values >> np.maximum(-shift, 0))


class ChannelwiseCoder:
    """Latents [h, w, M] with their side information z <-> one byte string."""

    def __init__(self, model: dict, kernels: List[np.ndarray], biases: List[np.ndarray]):
        self.side = ChannelCoder(model["hyper"])
        gaussian = model["gaussian"]
        self.tables = ChannelCoder(gaussian)  # table s * levels + f: scale s, mean fraction f
        self.levels = int(gaussian["mean_levels"])
        self.scales = len(gaussian["scales"])
        self.bits = self.levels.bit_length() - 1
        if self.levels != 1 << self.bits or len(self.tables.models) != self.scales * self.levels:
            raise LatentpackError("channelwise entropy model: mean_levels must be a power of two, tables scales x levels")
        self.radius = -self.tables.offsets
        self.slices = [int(s) for s in model["slices"]]
        self.latent_channels = sum(self.slices)
        hyper = model["hyper_synthesis"]
        self.features = 2 * self.latent_channels
        self.hyper_synthesis = IntegerNetwork(hyper, kernels[:len(hyper)], biases[:len(hyper)],
                                              np.full(len(model["hyper"]["offsets"]), float(LATENT_LIMIT)))
        # Decoded latents enter the context networks at the features' fixed point.
        self.feature_bits = int(model["feature_bits"])
        if not 0 <= self.feature_bits <= 24:
            raise LatentpackError("channelwise entropy model: feature_bits out of range")
        self.contexts, self.maps, self.starts, self.acc_bits, at, before = [], [], [], [], len(hyper), 0
        for size, layers in zip(self.slices, model["context"]):
            peaks = np.concatenate([np.full(self.features, float(ACTIVATION_LIMIT)),
                                    np.full(before, float(LATENT_LIMIT) * 2.0 ** self.feature_bits)])
            self.contexts.append(IntegerNetwork(layers, kernels[at:at + len(layers)], biases[at:at + len(layers)], peaks))
            last = layers[-1]
            mean_bits = np.asarray(last["mean_bits"], np.int64)
            offset, step = np.asarray(last["index_offset"], np.int64), np.asarray(last["index_step"], np.int64)
            if not (mean_bits.shape == offset.shape == step.shape == (size,)) or (mean_bits <= self.bits).any() \
                    or (step <= 0).any() or self.contexts[-1].cout != 2 * size:
                raise LatentpackError("channelwise entropy model: a slice's mean and scale mapping does not fit it")
            self.maps.append((mean_bits, offset, step))
            self.starts.append(before)
            self.acc_bits.append(np.concatenate([mean_bits, np.asarray(last["scale_bits"], np.int64)]))
            if self.acc_bits[-1].shape != (2 * size,) or (np.abs(self.acc_bits[-1] - self.feature_bits) > 40).any():
                raise LatentpackError("channelwise entropy model: a slice's fixed points do not fit it")
            at, before = at + len(layers), before + size
        if at != len(kernels) or self.hyper_synthesis.cout != self.features:
            raise LatentpackError("channelwise entropy model: the integer networks do not match the slices")

    def side_information(self, z: np.ndarray, grid: Tuple[int, int]) -> np.ndarray:
        """z as the decoder will have it: cropped to the latent grid's quarter, clipped to its tables."""
        z = z[:-(-grid[0] // 4), :-(-grid[1] // 4)]
        return self.side.symbols(z) + self.side.offsets

    def _features(self, z_hat: np.ndarray, grid: Tuple[int, int]) -> np.ndarray:
        return self.hyper_synthesis(z_hat)[:grid[0], :grid[1]].astype(np.float64)

    def _tables(self, i: int, features: np.ndarray, before: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(centre, table) of every latent of slice i [h, w, size]: int32 each."""
        if before.shape[-1]:
            x = np.concatenate([features, before.astype(np.float64) * 2.0 ** self.feature_bits], axis=-1)
        else:
            x = features
        acc = self.contexts[i](x)
        size, start = self.slices[i], self.starts[i]
        mean_bits, offset, step = self.maps[i]
        # The slice's own mean and log-scale features plus the context network's corrections, at
        # each output channel's fixed point.
        own = features[..., np.r_[start:start + size, self.latent_channels + start:self.latent_channels + start + size]]
        acc = acc + _at_bits(own.astype(np.int64), self.acc_bits[i] - self.feature_bits)
        # The mean in multiples of 1/levels, rounded (ties up): its integer part centres the table,
        # its fraction picks one of `levels` shifted Gaussians.
        steps = (acc[..., :size] + (np.int64(1) << (mean_bits - self.bits - 1))) >> (mean_bits - self.bits)
        centre = (steps + (self.levels >> 1)) >> self.bits
        fraction = steps - (centre << self.bits) + (self.levels >> 1)
        scale = np.clip((acc[..., size:] - offset) // step, 0, self.scales - 1)
        return np.clip(centre, -LATENT_LIMIT, LATENT_LIMIT).astype(np.int32), \
            (scale * self.levels + fraction).astype(np.int32)

    def _groups(self, table: np.ndarray):
        """(table, flat positions in raster order) for each table in use, in table order."""
        flat = table.reshape(-1)
        order = np.argsort(flat, kind="stable")
        counts = np.bincount(flat, minlength=len(self.radius))
        start = 0
        for t in np.flatnonzero(counts):
            yield int(t), order[start:start + counts[t]]
            start += counts[t]

    def _code(self, y: np.ndarray, z_hat: np.ndarray, coder=None) -> np.ndarray:
        """The latents a code of y holds (each clipped to its table), written to `coder` if given."""
        grid = y.shape[:2]
        features = self._features(z_hat, grid)
        held = np.empty(y.shape, np.int16)
        start = 0
        for i, size in enumerate(self.slices):
            centre, table = self._tables(i, features, held[..., :start])
            values = y[..., start:start + size].astype(np.int32).reshape(-1) - centre.reshape(-1)
            flat = np.empty(values.size, np.int16)
            for t, chosen in self._groups(table):
                r = int(self.radius[t])
                symbols = np.clip(values[chosen], -r, r)
                if coder is not None:
                    coder.encode(symbols + r, self.tables.models[t])
                flat[chosen] = symbols
            held[..., start:start + size] = (flat.reshape(centre.shape) + centre).astype(np.int16)
            start += size
        return held

    def encode(self, y: np.ndarray, z: np.ndarray) -> Tuple[bytes, np.ndarray]:
        """(code, the latents it holds: y clipped to its tables)."""
        z_hat = self.side_information(z, y.shape[:2])
        coder = constriction.stream.queue.RangeEncoder()
        self.side.write(coder, z_hat)
        held = self._code(y, z_hat, coder)
        return finish(coder), held

    def clipped(self, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """The latents a code of (y, z) holds, without coding them."""
        return self._code(y, self.side_information(z, y.shape[:2]))

    def decode(self, code: bytes, height: int, width: int, words: str = BIG) -> np.ndarray:
        """One code -> latents [height, width, M] (int16; height, width: the latent grid)."""
        coder = CheckedReader(code, words)
        z_hat = self.side.read(coder, -(-height // 4), -(-width // 4))
        features = self._features(z_hat, (height, width))
        out = np.empty((height, width, self.latent_channels), np.int16)
        start = 0
        for i, size in enumerate(self.slices):
            centre, table = self._tables(i, features, out[..., :start])
            flat = np.empty(centre.size, np.int32)
            for t, chosen in self._groups(table):
                flat[chosen] = coder.decode(self.tables.models[t], len(chosen)) - int(self.radius[t])
            out[..., start:start + size] = (flat.reshape(centre.shape) + centre).astype(np.int16)
            start += size
        coder.verify()
        return out

    def table_of(self, y: np.ndarray, z: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(centre, table) of every latent of y [h, w, M] under side information z: what its code uses."""
        grid = y.shape[:2]
        features = self._features(self.side_information(z, grid), grid)
        centres, tables, start = [], [], 0
        for i, size in enumerate(self.slices):
            centre, table = self._tables(i, features, y[..., :start])
            centres.append(centre)
            tables.append(table)
            start += size
        return np.concatenate(centres, axis=-1), np.concatenate(tables, axis=-1)


class ChannelwiseCodec(SpatialCodec):

    def make_coder(self):
        try:
            self._hyper_encode = self._model.signatures["hyper_encode"]
            kernels = [k.numpy() for k in self._model.integer_kernels]
            biases = [b.numpy() for b in self._model.integer_biases]
        except (KeyError, AttributeError) as e:
            raise LatentpackError(f"{self.model_dir}: the SavedModel lacks the channelwise entropy model ({e})") from None
        model = self.spec.entropy_model
        layers = list(model["hyper_synthesis"]) + [layer for net in model["context"] for layer in net]
        if len(kernels) != len(layers) or any(list(k.shape) != list(layer["kernel_shape"])
                                              for k, layer in zip(kernels, layers)):
            raise LatentpackError(f"{self.model_dir}: codec.json's integer networks do not match its SavedModel")
        return ChannelwiseCoder(model, kernels, biases)

    def _side(self, latent: np.ndarray) -> np.ndarray:
        return self._hyper_encode(latent=np.ascontiguousarray(latent, np.int16))["hyper"].numpy()

    def latent_values(self, latent: np.ndarray, latent_format: str) -> list:
        z = self._side(latent)
        if latent_format == "code":
            return [self.coder.encode(y, side)[0] for y, side in zip(latent, z)]
        return [self.coder.clipped(y, side).reshape(-1) for y, side in zip(latent, z)]

    def rate_tables(self) -> dict:
        return self.spec.entropy_model["gaussian"]

    def latent_tables(self, latent: np.ndarray):
        """The table (and its centre) of each latent of a batch, as its code will use them."""
        from pipeline.refine import LatentTables

        z = self._side(latent)
        pairs = [self.coder.table_of(y, side) for y, side in zip(latent, z)]
        return LatentTables(np.stack([t for _, t in pairs]), np.stack([c for c, _ in pairs]))

    def out_of_tables(self, latent: np.ndarray) -> bool:
        # Any int16 latent can be coded: its table is centred on its predicted mean, so only a
        # code decides which values fit; int-format rows are re-checked by coding them.
        return False
