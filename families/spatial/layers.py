"""Generalized divisive normalization (Ballé et al. 2016), the nonlinearity of the photo codec.

    GDN:  y_i = x_i / sqrt(beta_i + sum_j gamma_ij * x_j^2)
    IGDN: y_i = x_i * sqrt(beta_i + sum_j gamma_ij * x_j^2)

beta and gamma are stored reparameterized, as in TensorFlow Compression: the variable is
the square root of the parameter plus a small pedestal, and the parameter is
`max(v, floor)^2 - pedestal`. That keeps beta > 0 and gamma >= 0 without a projection
step, and gradients stay well scaled near zero; trained unconstrained on CPU the model
diverged after ~10k steps.
"""
from __future__ import annotations

import keras
import tensorflow as tf

_PEDESTAL = 2.0 ** -36


class GDN(keras.layers.Layer):
    """GDN over the last (channel) axis; `inverse=True` is IGDN for the synthesis transform."""

    def __init__(self, inverse: bool = False, beta_min: float = 1e-6, gamma_init: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.inverse, self.beta_min, self.gamma_init = inverse, beta_min, gamma_init

    def build(self, input_shape):
        c = int(input_shape[-1])
        self._beta_floor = (self.beta_min + _PEDESTAL) ** 0.5
        self._gamma_floor = _PEDESTAL ** 0.5
        self.beta_v = self.add_weight(name="beta", shape=(c,),
                                      initializer=keras.initializers.Constant((1.0 + _PEDESTAL) ** 0.5))
        gamma = self.gamma_init * tf.eye(c) + _PEDESTAL
        self.gamma_v = self.add_weight(name="gamma", shape=(c, c),
                                       initializer=keras.initializers.Constant(tf.sqrt(gamma).numpy()))

    @property
    def beta(self):
        return tf.square(tf.maximum(self.beta_v, self._beta_floor)) - _PEDESTAL

    @property
    def gamma(self):
        return tf.square(tf.maximum(self.gamma_v, self._gamma_floor)) - _PEDESTAL

    def call(self, x):
        # sum_j gamma_ij x_j^2 is a 1x1 convolution of x^2 with kernel gamma^T.
        norm = tf.tensordot(tf.square(x), tf.transpose(self.gamma), axes=[[-1], [0]]) + self.beta
        norm = tf.sqrt(norm)
        return x * norm if self.inverse else x / norm

    def get_config(self):
        return dict(super().get_config(), inverse=self.inverse, beta_min=self.beta_min, gamma_init=self.gamma_init)
