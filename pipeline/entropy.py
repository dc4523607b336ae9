"""Entropy coding of integer latents with the artifact's frozen prior (constriction's range coder).

Each image becomes one byte string. The tables are integers stored in codec.json;
they are handed to constriction as probabilities `frequency / 2**precision`, which
are exact in float64, so a code decodes identically on any machine.
"""
from __future__ import annotations

from typing import List, Sequence

import constriction
import numpy as np


class EntropyCoder:
    """Integer latents [N, D] <-> a list of N codes (bytes)."""

    def __init__(self, model: dict):
        tables = model["frequencies"]
        self.offsets = np.asarray(model["offsets"], np.int64)
        self.sizes = np.array([len(t) for t in tables], np.int64)
        total = float(1 << model["precision"])
        # One row per dimension, zero-padded to the widest table; padding is never encoded.
        self.probabilities = np.zeros((len(tables), int(self.sizes.max())), np.float64)
        for d, table in enumerate(tables):
            self.probabilities[d, :len(table)] = np.asarray(table, np.float64) / total
        self.family = constriction.stream.model.Categorical(perfect=False)

    def symbols(self, latents: np.ndarray) -> np.ndarray:
        symbols = latents.astype(np.int64) - self.offsets
        if (symbols < 0).any() or (symbols >= self.sizes).any():
            raise ValueError("latent values outside the entropy model's tables")
        return symbols.astype(np.int32)

    def encode(self, latents: np.ndarray) -> List[bytes]:
        codes = []
        for row in self.symbols(latents):
            coder = constriction.stream.queue.RangeEncoder()
            coder.encode(row, self.family, self.probabilities)
            codes.append(finish(coder))
        return codes

    def decode(self, codes: Sequence[bytes]) -> np.ndarray:
        out = np.empty((len(codes), len(self.sizes)), np.int64)
        for i, code in enumerate(codes):
            out[i] = reader(code).decode(self.family, self.probabilities)
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

    def decode(self, code: bytes, height: int, width: int) -> np.ndarray:
        """One code -> latents [height, width, C] (height, width: the latent grid)."""
        return self.read(reader(code), height, width)


def finish(coder) -> bytes:
    """A range encoder's bytes. It emits 32-bit words; up to 3 trailing zero bytes carry nothing."""
    data = coder.get_compressed().tobytes()
    end = len(data)
    while end > len(data) - 3 and end > 0 and data[end - 1] == 0:
        end -= 1
    return data[:end]


def reader(code: bytes):
    """A range decoder over a code written by `finish` (its trimmed zero bytes restored)."""
    return constriction.stream.queue.RangeDecoder(np.frombuffer(code + b"\0" * (-len(code) % 4), np.uint32))
