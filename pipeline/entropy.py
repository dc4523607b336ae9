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
            data = coder.get_compressed().tobytes()
            # The coder emits 32-bit words; up to 3 trailing zero bytes carry nothing.
            end = len(data)
            while end > len(data) - 3 and end > 0 and data[end - 1] == 0:
                end -= 1
            codes.append(data[:end])
        return codes

    def decode(self, codes: Sequence[bytes]) -> np.ndarray:
        out = np.empty((len(codes), len(self.sizes)), np.int64)
        for i, code in enumerate(codes):
            padded = code + b"\0" * (-len(code) % 4)
            coder = constriction.stream.queue.RangeDecoder(np.frombuffer(padded, np.uint32))
            out[i] = coder.decode(self.family, self.probabilities)
        return out + self.offsets
