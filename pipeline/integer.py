"""Exact integer convolutional networks: what chooses an entropy table must give the same answer
on every machine.

An `IntegerNetwork` is a list of layers, each a convolution ("same" padding, stride 1) or a
transposed convolution (stride 1 or 2, "same" as Keras' Conv2DTranspose) with integer kernels
and biases, an optional ReLU, then an arithmetic right shift per output channel and a
saturation to +-ACTIVATION_LIMIT (a hidden layer, and a last layer whose output is features);
a last layer without a shift outputs its integer accumulators, mapped to tables by the family's
own integer arithmetic.

It is evaluated with float64 matrix products whose operands, products and partial sums are all
integers below 2**53 -- exact in any summation order, thread count or BLAS. `IntegerNetwork`
checks that bound when it is built, from each layer's kernel and the largest input it can see
(the first layer's `input_peaks`, per input channel; ACTIVATION_LIMIT after that), so an artifact
that could overflow is refused at load, never decoded wrongly.

Large grids are evaluated in strips of rows (`STRIP_POSITIONS` output positions each), each with
enough rows of context that its inner rows are exactly the whole grid's.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.errors import LatentpackError


_BLAS = None


def one_blas_thread():
    """A context in which BLAS runs on the calling thread alone. The integer networks' matrix
    products are small (a latent grid's positions by a few hundred channels): spread over BLAS's
    threads while TensorFlow's pool, the job's writer thread or other workers hold the cores, they
    wait for cores they do not get (on one thread they never wait): photo:4 decodes at 1.71 Mpx/s
    against 1.25 with BLAS's default threads on an idle 2-core machine (`scripts/blas_threads.py`),
    and a busy machine makes the difference far larger. The results are the same integers."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")

EXACT = 2.0 ** 53
ACTIVATION_LIMIT = 2 ** 16 - 1
KERNEL_LIMIT = 2 ** 24
STRIP_POSITIONS = 1 << 14


def _ints(values, dtype=np.int64) -> np.ndarray:
    return np.asarray(values, dtype)


class IntegerLayer:
    """One layer: `kernel` [K, K, Cin, Cout] (a convolution) or [K, K, Cout, Cin] (transposed, as
    Keras stores both), `bias` [Cout], `stride`, `transpose`, `relu`, `shift` (None: the last
    layer; else an int or one per output channel)."""

    def __init__(self, meta: dict, kernel: np.ndarray, bias: np.ndarray):
        self.stride = int(meta.get("stride", 1))
        self.transpose = bool(meta.get("transpose", False))
        self.relu = bool(meta.get("relu", False))
        shift = meta.get("shift")
        kernel = _ints(kernel)
        if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0 and not self.transpose:
            raise LatentpackError("integer network: kernels must be square (odd for convolutions)")
        if self.stride not in (1, 2) or (self.stride != 1 and not self.transpose):
            raise LatentpackError("integer network: convolutions have stride 1, transposed ones 1 or 2")
        self.size = kernel.shape[0]
        # Stored as [K, K, Cin, Cout] for both kinds.
        self.kernel = kernel.transpose(0, 1, 3, 2) if self.transpose else kernel
        self.bias = _ints(bias)
        self.cin, self.cout = self.kernel.shape[2], self.kernel.shape[3]
        if self.bias.shape != (self.cout,):
            raise LatentpackError("integer network: a bias per output channel")
        if np.abs(self.kernel).max(initial=0) > KERNEL_LIMIT:
            raise LatentpackError("integer network: kernel values beyond 2**24")
        self.shift = None if shift is None else np.broadcast_to(_ints(shift), (self.cout,)).copy()
        if self.shift is not None and not ((self.shift >= 0) & (self.shift < 62)).all():
            raise LatentpackError("integer network: shifts must be 0..61")
        self.weights = self.kernel.reshape(-1, self.cout).astype(np.float64)  # [K*K*Cin, Cout]

    def reach(self) -> int:
        """Input rows either side of an output row's that it reads."""
        return (self.size - 1) // 2 + 1 if self.transpose else self.size // 2

    def check(self, peaks: np.ndarray) -> None:
        """Refuse the layer if any partial sum could reach 2**53 with inputs of at most `peaks`."""
        if peaks.shape != (self.cin,):
            raise LatentpackError(f"integer network: a layer takes {self.cin} channels, its input has {len(peaks)}")
        total = (np.abs(self.kernel).astype(np.float64) * peaks[None, None, :, None]).sum(axis=(0, 1, 2))
        if (total + np.abs(self.bias)).max(initial=0) >= EXACT:
            raise LatentpackError("integer network: weights exceed the exact integer range")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x [h, w, Cin] (integers, float64) -> the accumulators [h', w', Cout] (int64), or after a
        hidden layer's ReLU, shift and saturation the next input (float64)."""
        h, w, _ = x.shape
        k = self.size
        if self.transpose:
            acc = self._transposed(x)
        else:
            pad = k // 2
            padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
            columns = np.empty((h, w, k, k, self.cin))
            for ky in range(k):
                for kx in range(k):
                    columns[:, :, ky, kx] = padded[ky:ky + h, kx:kx + w]
            acc = (columns.reshape(h * w, -1) @ self.weights).reshape(h, w, self.cout)
        acc = acc.astype(np.int64) + self.bias
        if self.relu:
            acc = np.maximum(acc, 0)
        if self.shift is None:
            return acc
        return np.clip(acc >> self.shift, -ACTIVATION_LIMIT, ACTIVATION_LIMIT).astype(np.float64)

    def _transposed(self, x: np.ndarray) -> np.ndarray:
        """Output position s*i + t - (K - s)//2 receives input i times tap t (Keras' "same")."""
        h, w, cin = x.shape
        s, k = self.stride, self.size
        before = (k - s) // 2
        out = np.zeros((s * h + k, s * w + k, self.cout))
        flat = x.reshape(-1, cin)
        for ky in range(k):
            for kx in range(k):
                out[ky:ky + s * h:s, kx:kx + s * w:s] += (flat @ self.kernel[ky, kx].astype(np.float64)).reshape(
                    h, w, self.cout)
        return out[before:before + s * h, before:before + s * w]


class IntegerNetwork:
    """Layers in sequence; `input_peaks` [Cin]: the largest magnitude each input channel may hold
    (inputs are clipped to it)."""

    def __init__(self, layers: Sequence[dict], kernels: Sequence[np.ndarray], biases: Sequence[np.ndarray],
                 input_peaks: np.ndarray):
        if not layers or len(layers) != len(kernels) or len(layers) != len(biases):
            raise LatentpackError("integer network: a kernel and a bias per layer")
        self.layers = [IntegerLayer(m, k, b) for m, k, b in zip(layers, kernels, biases)]
        if any(layer.shift is None for layer in self.layers[:-1]):
            raise LatentpackError("integer network: hidden layers shift their accumulators")
        self.input_peaks = np.asarray(input_peaks, np.float64)
        peaks = self.input_peaks
        for layer in self.layers:
            layer.check(peaks)
            peaks = np.full(layer.cout, float(ACTIVATION_LIMIT))
        self.scale = int(np.prod([layer.stride for layer in self.layers]))
        # Input rows of context a strip needs either side: each layer's reach, in input rows.
        self.margin = sum(layer.reach() for layer in self.layers) + 1
        self.cout = self.layers[-1].cout

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x [h, w, Cin] (integers) -> the last layer's output [s*h, s*w, Cout] (int64): its
        accumulators, or its activations if it shifts too."""
        with one_blas_thread():
            return self._strips(x)

    def _strips(self, x: np.ndarray) -> np.ndarray:
        x = np.clip(np.asarray(x, np.float64), -self.input_peaks, self.input_peaks)
        h, w = x.shape[:2]
        rows = max(1, STRIP_POSITIONS // max(1, self.scale * self.scale * w))
        if h <= rows:
            return self._run(x)
        s = self.scale
        out = np.empty((s * h, s * w, self.cout), np.int64)
        for a in range(0, h, rows):
            b = min(h, a + rows)
            lo, hi = max(0, a - self.margin), min(h, b + self.margin)
            out[s * a:s * b] = self._run(x[lo:hi])[s * (a - lo):s * (b - lo)]
        return out

    def _run(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer(x)
        return x.astype(np.int64)


def check_layers(layers, where: str, what: str) -> None:
    """codec.json's description of an integer network: a list of layers with integer settings."""
    def integer(v):
        return isinstance(v, int) and not isinstance(v, bool)

    ok = isinstance(layers, list) and layers and all(isinstance(x, dict) for x in layers)
    ok = ok and all(integer(x.get("stride", 1)) and isinstance(x.get("kernel_shape"), list) and len(x["kernel_shape"]) == 4
                    and all(integer(d) and d > 0 for d in x["kernel_shape"]) for x in layers)
    ok = ok and all(integer(x.get("shift")) or isinstance(x.get("shift"), list) and all(map(integer, x["shift"]))
                    for x in layers[:-1])
    if not ok:
        raise LatentpackError(f"{where}: invalid entropy_model: malformed {what} layers")
