"""The dense family's codec.json fields: one image shape, a latent vector, its quantizer."""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from pipeline.fields import Fields, FrozenDict, freeze, validate_tables


@dataclasses.dataclass(frozen=True)
class DenseSection:
    image_shape: Tuple[int, int, int]
    latent_dim: int
    quantization: FrozenDict


def parse(fields: Fields) -> Tuple[DenseSection, Optional[dict]]:
    raw = fields.raw
    section = DenseSection(
        image_shape=tuple(fields.need("image_shape", list, lambda v: len(v) == 3 and all(
            isinstance(d, int) and d > 0 for d in v) and v[2] in (1, 3))),
        latent_dim=fields.need("latent_dim", int, lambda v: v > 0),
        quantization=freeze(fields.need("quantization", dict, lambda v: isinstance(v.get("bits"), int))))
    model = raw.get("entropy_model")
    if model is not None:
        validate_tables(model, section.latent_dim, fields.where)
        if model.get("kind") == "factorized-mixture":
            validate_mixture(model, section.latent_dim, fields.where)
    return section, model


def validate_mixture(model: dict, count: int, where: str) -> None:
    """A mixture's table sets (each `count` tables of the base tables' sizes) and their frequencies."""
    from pipeline.errors import LatentpackError

    sets, weights = model.get("components"), model.get("weights")
    if not isinstance(sets, list) or not 1 <= len(sets) <= 256 or not isinstance(weights, list) or \
            len(weights) != len(sets):
        raise LatentpackError(f"{where}: invalid entropy_model: a mixture needs 1-256 'components' and as many 'weights'")
    validate_tables({"precision": model["precision"], "offsets": [0], "frequencies": [weights]}, 1, where)
    sizes = [len(t) for t in model["frequencies"]]
    for tables in sets:
        validate_tables(dict(model, frequencies=tables), count, where)
        if [len(t) for t in tables] != sizes:
            raise LatentpackError(f"{where}: invalid entropy_model: mixture tables differ in size from the prior's")
