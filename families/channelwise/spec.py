"""The channelwise family's codec.json fields: the hyperprior's, and its slices, tables and networks."""
from __future__ import annotations

from typing import Tuple

from families.hyperprior.spec import HyperpriorSection
from families.spatial.spec import spatial_fields
from pipeline.errors import LatentpackError
from pipeline.fields import Fields, validate_tables
from pipeline.integer import check_layers


def parse(fields: Fields) -> Tuple[HyperpriorSection, dict]:
    section = HyperpriorSection(**spatial_fields(fields),
                                hyper_channels=fields.need("hyper_channels", int, lambda v: 0 < v <= 1024))
    validate_channelwise(fields.raw["entropy_model"], section.hyper_channels, section.latent_channels, fields.where)
    return section, fields.raw["entropy_model"]


def validate_channelwise(model, hyper_channels: int, latent_channels: int, where: str) -> None:
    """Side information tables, Gaussian tables (scales x mean fractions), slices and integer networks."""
    if not isinstance(model, dict) or model.get("kind") != "channelwise-mean-scale":
        raise LatentpackError(f"{where}: invalid entropy_model: expected kind 'channelwise-mean-scale'")
    validate_tables(model.get("hyper"), hyper_channels, where)
    if not isinstance(model.get("feature_bits"), int):
        raise LatentpackError(f"{where}: invalid entropy_model: needs an integer 'feature_bits'")
    gaussian = model.get("gaussian")
    levels = gaussian.get("mean_levels") if isinstance(gaussian, dict) else None
    scales = gaussian.get("scales") if isinstance(gaussian, dict) else None
    if not isinstance(levels, int) or levels < 1 or levels & (levels - 1) or not isinstance(scales, list) or not scales:
        raise LatentpackError(f"{where}: invalid entropy_model: Gaussian tables need 'scales' and a power-of-two "
                              "'mean_levels'")
    validate_tables(gaussian, len(scales) * levels, where)
    slices = model.get("slices")
    if not isinstance(slices, list) or not slices or not all(isinstance(s, int) and s > 0 for s in slices) or \
            sum(slices) != latent_channels:
        raise LatentpackError(f"{where}: invalid entropy_model: 'slices' must add up to the latent channels")
    check_layers(model.get("hyper_synthesis"), where, "hyper_synthesis")
    context = model.get("context")
    if not isinstance(context, list) or len(context) != len(slices):
        raise LatentpackError(f"{where}: invalid entropy_model: a context network per slice")
    for layers in context:
        check_layers(layers, where, "context")
        last = layers[-1]
        if not all(isinstance(last.get(k), list) for k in ("mean_bits", "scale_bits", "index_offset", "index_step")):
            raise LatentpackError(f"{where}: invalid entropy_model: a context network without its integer mappings")
