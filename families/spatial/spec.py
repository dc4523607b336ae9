"""The spatial family's codec.json fields: any image size, latents [ceil(H/s), ceil(W/s), M]."""
from __future__ import annotations

import dataclasses
from typing import Tuple

from pipeline.fields import Fields, validate_tables


@dataclasses.dataclass(frozen=True)
class SpatialSection:
    stride: int  # the image is padded to a multiple of it; latents at 1/stride of its size
    channels: int  # image channels the transforms take (3: grey sources are coded as RGB)
    latent_channels: int


def spatial_fields(fields: Fields) -> dict:
    """The fields every photo family shares (the spatial family's), checked."""
    out = dict(stride=fields.need("stride", int, lambda v: v in (8, 16, 32, 64)),
               channels=fields.need("channels", int, lambda v: v == 3),
               latent_channels=fields.need("latent_channels", int, lambda v: 0 < v <= 1024))
    if fields.raw.get("latent_dtype") != "int16":
        raise fields.error(f"{fields.raw.get('family')} models store int16 latents")
    fields.need("entropy_model", dict)
    return out


def parse(fields: Fields) -> Tuple[SpatialSection, dict]:
    section = SpatialSection(**spatial_fields(fields))
    validate_tables(fields.raw["entropy_model"], section.latent_channels, fields.where)
    return section, fields.raw["entropy_model"]
