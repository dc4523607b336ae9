"""The hyperprior family's codec.json fields: the spatial ones, side information and its tables."""
from __future__ import annotations

import dataclasses
from typing import Tuple

from families.spatial.spec import SpatialSection, spatial_fields
from pipeline.errors import LatentpackError
from pipeline.fields import Fields, validate_tables


@dataclasses.dataclass(frozen=True)
class HyperpriorSection(SpatialSection):
    hyper_channels: int  # channels of the side information z


def parse(fields: Fields) -> Tuple[HyperpriorSection, dict]:
    section = HyperpriorSection(**spatial_fields(fields),
                                hyper_channels=fields.need("hyper_channels", int, lambda v: 0 < v <= 1024))
    validate_hyperprior(fields.raw["entropy_model"], section.hyper_channels, fields.where)
    return section, fields.raw["entropy_model"]


def validate_hyperprior(model, hyper_channels: int, where: str) -> None:
    """The side information's tables, the Gaussian tables, and the integer hyper-synthesis layers."""
    if not isinstance(model, dict) or model.get("kind") != "scale-hyperprior":
        raise LatentpackError(f"{where}: invalid entropy_model: expected kind 'scale-hyperprior'")
    validate_tables(model.get("hyper"), hyper_channels, where)
    gaussian = model.get("gaussian")
    count = len(gaussian.get("offsets") or []) if isinstance(gaussian, dict) else 0
    validate_tables(gaussian, max(count, 1), where)
    if any(o != -(len(t) // 2) or len(t) % 2 != 1 or len(t) < 3
           for o, t in zip(gaussian["offsets"], gaussian["frequencies"])):
        raise LatentpackError(f"{where}: invalid entropy_model: Gaussian tables must be symmetric around zero "
                              "(at least -1..1)")
    layers = model.get("hyper_synthesis")
    ints = lambda layer, *names: all(isinstance(layer.get(n), int) and not isinstance(layer.get(n), bool)  # noqa: E731
                                     for n in names)
    if not isinstance(layers, list) or not layers or not all(isinstance(x, dict) for x in layers) or \
            not all(ints(x, "stride", "shift") for x in layers[:-1]) or \
            not ints(layers[-1], "stride", "index_offset", "index_step"):
        raise LatentpackError(f"{where}: invalid entropy_model: malformed hyper_synthesis layers")
