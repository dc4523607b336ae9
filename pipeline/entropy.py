"""Entropy coding of integer latents with the artifact's frozen prior (constriction's range coder).

Each image becomes one byte string. The tables are integers stored in codec.json;
they are handed to constriction as probabilities `frequency / 2**precision`, which
are exact in float64, so a code decodes identically on any machine.

A code's bytes (`finish`, `reader`): since dataset format 3, the range coder's 32-bit words in
big-endian order, its final state written as the point of its last interval with the fewest
significant bits, and trailing zero bytes dropped (the decoder reads zeros past the end): about
1.6 bytes per code fewer than constriction's own sealing (`scripts/code_ends.py`), which matters for thumbnails (a CIFAR
code is ~30 bytes). Formats 1 and 2 stored constriction's sealed words in little-endian order;
`words_for` says which a dataset uses, and both read.
"""
from __future__ import annotations

from typing import List, Sequence

import constriction
import numpy as np

BIG, LITTLE = "big", "little"  # a code's 32-bit words in its bytes: format 3, formats 1-2


class EntropyCoder:
    """Integer latents [N, D] <-> a list of N codes (bytes).

    A `factorized-mixture` model (`training.prior.add_mixture`) has several table sets: each code
    starts with the number of the set it uses (coded with the sets' own frequencies), chosen at
    encode time as the one giving the shortest code; decoding reads it, so it never chooses."""

    def __init__(self, model: dict):
        sets = model["components"] if model.get("kind") == "factorized-mixture" else [model["frequencies"]]
        self.offsets = np.asarray(model["offsets"], np.int64)
        self.sizes = np.array([len(t) for t in sets[0]], np.int64)
        total = float(1 << model["precision"])
        # [set, dimension, value], zero-padded to the widest table; padding is never encoded.
        self.probabilities = np.zeros((len(sets), len(self.sizes), int(self.sizes.max())), np.float64)
        for k, tables in enumerate(sets):
            for d, table in enumerate(tables):
                self.probabilities[k, d, :len(table)] = np.asarray(table, np.float64) / total
        self.weights = (np.asarray(model["weights"], np.float64)[None, :] / total if len(sets) > 1 else None)
        # Code lengths [set, dimension, value] in integer 1/1024ths of a bit, so the choice of set is the
        # same everywhere; and each set's own (its number's) length, none without a mixture.
        with np.errstate(divide="ignore"):
            self.costs = np.round(-1024 * np.log2(self.probabilities)).clip(max=1 << 40).astype(np.int64)
            self.set_costs = (np.round(-1024 * np.log2(self.weights[0])).astype(np.int64) if self.weights is not None
                              else np.zeros(1, np.int64))
        self.family = constriction.stream.model.Categorical(perfect=False)

    def symbols(self, latents: np.ndarray) -> np.ndarray:
        symbols = latents.astype(np.int64) - self.offsets
        if (symbols < 0).any() or (symbols >= self.sizes).any():
            raise ValueError("latent values outside the entropy model's tables")
        return symbols.astype(np.int32)

    def choose(self, symbols: np.ndarray) -> np.ndarray:
        """The table set coding each row [N, D] of symbols shortest: [N] (all 0 without a mixture)."""
        if self.weights is None:
            return np.zeros(len(symbols), np.int64)
        dims = np.arange(symbols.shape[1])[None, :]
        lengths = np.stack([self.costs[k][dims, symbols].sum(1) for k in range(len(self.costs))], axis=1)
        return (lengths + self.set_costs[None, :]).argmin(1)

    def encode(self, latents: np.ndarray) -> List[bytes]:
        codes = []
        symbols = self.symbols(latents)
        for row, k in zip(symbols, self.choose(symbols)):
            coder = constriction.stream.queue.RangeEncoder()
            if self.weights is not None:
                coder.encode(np.array([k], np.int32), self.family, self.weights)
            coder.encode(row, self.family, self.probabilities[k])
            codes.append(finish(coder))
        return codes

    def decode(self, codes: Sequence[bytes], words: str = BIG) -> np.ndarray:
        out = np.empty((len(codes), len(self.sizes)), np.int64)
        for i, code in enumerate(codes):
            decoder = CheckedReader(code, words)
            k = int(decoder.decode(self.family, self.weights)[0]) if self.weights is not None else 0
            out[i] = decoder.decode(self.family, self.probabilities[k])
            decoder.verify()
        return out + self.offsets


class ChannelCoder:
    """Spatial latents [h, w, C] <-> one byte string, one integer table per channel.

    Every channel's values are coded in raster order with that channel's table, channel
    after channel, into one range-coder stream; values beyond a table's ends are clipped
    to them (the tables' tails hold all but ~1e-7 of the training mass). A table of one
    symbol (a channel the model learned to leave constant) costs no bits and writes nothing.
    """

    def __init__(self, model):
        tables = model["frequencies"]
        self.offsets = np.asarray(model["offsets"], np.int64)
        self.sizes = np.array([len(t) for t in tables], np.int64)
        total = float(1 << model["precision"])
        self.models = [constriction.stream.model.Categorical(np.asarray(t, np.float64) / total, perfect=False)
                       if len(t) > 1 else None for t in tables]

    def symbols(self, latent: np.ndarray) -> np.ndarray:
        """Latents [h, w, C] -> table indices, clipped to each table."""
        return np.clip(latent.astype(np.int64) - self.offsets, 0, self.sizes - 1).astype(np.int32)

    def write(self, coder, latent: np.ndarray) -> None:
        """Append latents [h, w, C] to a range coder (channel after channel)."""
        symbols = self.symbols(latent)
        for c, model in enumerate(self.models):
            if model is not None:
                coder.encode(np.ascontiguousarray(symbols[..., c]).reshape(-1), model)

    def read(self, coder, height: int, width: int) -> np.ndarray:
        """The next latents [height, width, C] from a range decoder (the mirror of `write`)."""
        out = np.zeros((len(self.models), height * width), np.int64)
        for c, model in enumerate(self.models):
            if model is not None:
                out[c] = coder.decode(model, height * width)
        return (out.T.reshape(height, width, -1) + self.offsets).astype(np.int64)

    def encode(self, latent: np.ndarray) -> bytes:
        coder = constriction.stream.queue.RangeEncoder()
        self.write(coder, latent)
        return finish(coder)

    def decode(self, code: bytes, height: int, width: int, words: str = BIG) -> np.ndarray:
        """One code -> latents [height, width, C] (height, width: the latent grid)."""
        decoder = CheckedReader(code, words)
        latent = self.read(decoder, height, width)
        decoder.verify()
        return latent


def words_for(format_version: int) -> str:
    """The byte layout of the codes in a dataset of this format version."""
    return BIG if format_version >= 3 else LITTLE


def finish(coder) -> bytes:
    """A range encoder's code: the words it has emitted, then a point of its final interval
    [lower, lower + range) with as many trailing zero bits as the interval allows, as big-endian
    32-bit words with the trailing zero bytes dropped. (Should the interval reach past 2**64, a
    point there would carry into the emitted words: then constriction's own final words.)"""
    position, (lower, size) = coder.pos()
    words = coder.get_compressed()
    if lower + size <= 1 << 64:
        return (words[:position].astype(">u4").tobytes()
                + shortest_point(lower, lower + size).to_bytes(8, "big")).rstrip(b"\0")
    return words.astype(">u4").tobytes().rstrip(b"\0")


def shortest_point(lower: int, upper: int) -> int:
    """The number in [lower, upper) with the most trailing zero bits: above the highest bit where
    lower and upper - 1 differ they agree; below it, upper - 1 with its lower bits cleared, unless
    lower itself has them all zero."""
    top = upper - 1
    if top < lower:
        raise ValueError(f"empty interval [{lower}, {upper})")
    differ = (lower ^ top).bit_length()
    if lower & ((1 << differ) - 1) == 0:
        return lower
    return (top >> (differ - 1)) << (differ - 1)


def reader(code: bytes, words: str = BIG):
    """A range decoder over a code (`finish`'s, or with `words=LITTLE` one of formats 1 and 2)."""
    padded = code + b"\0" * (-len(code) % 4)
    return constriction.stream.queue.RangeDecoder(
        np.frombuffer(padded, ">u4" if words == BIG else "<u4").astype(np.uint32))


class DamagedCode(ValueError):
    """A code that is not the one its decoded values encode to."""


class CheckedReader:
    """A range decoder that checks its code as it goes, at no cost in bytes: every symbol it
    decodes is also encoded again, with the same model, into an echo; at the end (`verify`) the
    echo's `finish` must be the code itself. A code is `finish`'s canonical output, so an empty,
    cut, lengthened, zeroed or random code, which the decoder would read as some plausible values,
    is caught: its values encode to other bytes. (Formats 1 and 2 wrote codes another way: words
    other than BIG are read unchecked.)"""

    def __init__(self, code: bytes, words: str = BIG):
        self.code = code
        self.decoder = reader(code, words)
        self.echo = constriction.stream.queue.RangeEncoder() if words == BIG else None

    def decode(self, model, *args):
        symbols = self.decoder.decode(model, *args)
        if self.echo is not None:
            params = args if args and not np.isscalar(args[0]) else ()
            self.echo.encode(np.asarray(symbols, np.int32), model, *params)
        return symbols

    def verify(self) -> None:
        if self.echo is not None and finish(self.echo) != self.code:
            raise DamagedCode(f"the code's {len(self.code)} bytes are not what its decoded values encode to")
