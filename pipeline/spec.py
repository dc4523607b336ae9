"""The codec spec: `codec.json` read once, validated, and passed down as one immutable object.

    spec = CodecSpec.from_dict(json.load(open("model/codec.json")), where="model/codec.json")
    spec.family, spec.fingerprint, spec.entropy_model, spec.latent_channels, ...

Format version 1 (latentpack 0.1) knows one family, `dense` (a fixed image shape and a
latent vector per image). Version 2 adds `family`, and the `spatial` family: any image
size, latents [ceil(H/16), ceil(W/16), M] coded per channel; and the `hyperprior` family:
the same latents coded with Gaussian tables chosen by an integer hyper-synthesis from side
information of `hyper_channels` channels. Version-1 files still load.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional, Tuple

from pipeline.errors import LatentpackError

FORMAT = "latentpack-codec"
# 2: spatial and hyperprior families. 3: a dense entropy model may be a mixture of table sets
# (`factorized-mixture`), whose codes an older reader would decode wrongly, so it refuses them.
# 4: the channelwise family.
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
FAMILIES = ("dense", "spatial", "hyperprior", "channelwise")
LATENT_DTYPES = ("int8", "int16")


class FrozenDict(dict):
    """A dict that refuses changes (and stays picklable, for Beam workers)."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a codec spec is immutable")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self):
        return FrozenDict, (dict(self),)

    def __hash__(self):
        return hash(json.dumps(self, sort_keys=True))


def _freeze(value):
    if isinstance(value, dict):
        return FrozenDict({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value):
    if isinstance(value, dict):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class CodecSpec:
    """Everything the pipeline knows about a model artifact, typed."""

    format_version: int
    family: str
    fingerprint: str
    architecture: FrozenDict
    latent_dtype: str
    entropy_model: Optional[FrozenDict] = None
    metrics: FrozenDict = dataclasses.field(default_factory=FrozenDict)
    training: FrozenDict = dataclasses.field(default_factory=FrozenDict)
    # dense family: one fixed image shape, a latent vector per image, a uniform quantizer.
    image_shape: Optional[Tuple[int, int, int]] = None
    latent_dim: Optional[int] = None
    quantization: Optional[FrozenDict] = None
    # spatial family: any image size (a multiple of `stride` after padding), latent channels.
    stride: Optional[int] = None
    channels: Optional[int] = None
    latent_channels: Optional[int] = None
    # hyperprior family: channels of the side information z.
    hyper_channels: Optional[int] = None

    @property
    def arch(self) -> str:
        return self.architecture["arch"]

    @property
    def entropy_coded(self) -> bool:
        return self.entropy_model is not None

    def to_dict(self) -> dict:
        """The codec.json fields (without `format`), as plain JSON values."""
        out = {"format": FORMAT}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                out[field.name] = _thaw(value)
        return out

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> "CodecSpec":
        """Validate a parsed codec.json; raises LatentpackError naming the file and the field."""
        if not isinstance(raw, dict):
            raise LatentpackError(f"{where}: expected a JSON object")

        def need(field, kind, check=lambda v: True, source=raw):
            if field not in source:
                raise LatentpackError(f"{where}: missing field {field!r}")
            value = source[field]
            if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool or not check(value):
                raise LatentpackError(f"{where}: invalid value for {field!r}: {str(value)[:80]!r}")
            return value

        need("format", str, lambda v: v == FORMAT)
        version = need("format_version", int, lambda v: v in READABLE_VERSIONS)
        family = raw.get("family", "dense") if version == 1 else need("family", str, lambda v: v in FAMILIES)
        if version == 1 and "family" in raw:
            raise LatentpackError(f"{where}: 'family' is a version-2 field")
        common = dict(
            format_version=version, family=family,
            fingerprint=need("fingerprint", str, lambda v: v.startswith("sha256:")),
            architecture=_freeze(need("architecture", dict, lambda v: isinstance(v.get("arch"), str))),
            latent_dtype=need("latent_dtype", str, lambda v: v in LATENT_DTYPES),
            metrics=_freeze(raw.get("metrics") or {}), training=_freeze(raw.get("training") or {}))
        if family == "dense":
            spec = cls(**common,
                       image_shape=tuple(need("image_shape", list, lambda v: len(v) == 3 and all(
                           isinstance(d, int) and d > 0 for d in v) and v[2] in (1, 3))),
                       latent_dim=need("latent_dim", int, lambda v: v > 0),
                       quantization=_freeze(need("quantization", dict, lambda v: isinstance(v.get("bits"), int))),
                       entropy_model=_freeze(raw["entropy_model"]) if "entropy_model" in raw else None)
            if spec.entropy_model is not None:
                validate_tables(raw["entropy_model"], spec.latent_dim, where)
                if raw["entropy_model"].get("kind") == "factorized-mixture":
                    validate_mixture(raw["entropy_model"], spec.latent_dim, where)
            return spec
        spec = cls(**common,
                   stride=need("stride", int, lambda v: v in (8, 16, 32, 64)),
                   channels=need("channels", int, lambda v: v == 3),
                   latent_channels=need("latent_channels", int, lambda v: 0 < v <= 1024),
                   hyper_channels=need("hyper_channels", int, lambda v: 0 < v <= 1024)
                   if family in ("hyperprior", "channelwise") else None,
                   entropy_model=_freeze(need("entropy_model", dict)))
        if spec.latent_dtype != "int16":
            raise LatentpackError(f"{where}: {family} models store int16 latents")
        if family == "spatial":
            validate_tables(raw["entropy_model"], spec.latent_channels, where)
        elif family == "hyperprior":
            validate_hyperprior(raw["entropy_model"], spec.hyper_channels, where)
        else:
            validate_channelwise(raw["entropy_model"], spec.hyper_channels, spec.latent_channels, where)
        return spec


def validate_channelwise(model, hyper_channels: int, latent_channels: int, where: str) -> None:
    """Side information tables, Gaussian tables (scales x mean fractions), slices and integer networks."""
    from pipeline.integer import check_layers

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


def validate_mixture(model: dict, count: int, where: str) -> None:
    """A mixture's table sets (each `count` tables of the base tables' sizes) and their frequencies."""
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


def validate_tables(model, count: int, where: str) -> None:
    """Integer tables only: `count` of them, each positive integers summing to 2**precision."""
    def bad(why):
        return LatentpackError(f"{where}: invalid entropy_model: {why}")

    if not isinstance(model, dict) or not isinstance(model.get("precision"), int) or not 8 <= model["precision"] <= 24:
        raise bad("needs an integer 'precision' between 8 and 24")
    offsets, tables = model.get("offsets"), model.get("frequencies")
    if not isinstance(offsets, list) or not isinstance(tables, list) or not len(offsets) == len(tables) == count:
        raise bad(f"needs {count} 'offsets' and 'frequencies' tables")
    for d, (offset, table) in enumerate(zip(offsets, tables)):
        if not isinstance(offset, int) or not isinstance(table, list) or not table or len(table) > 65536:
            raise bad(f"table {d}: malformed")
        if not all(isinstance(f, int) and f >= 1 for f in table) or sum(table) != 1 << model["precision"]:
            raise bad(f"table {d}: frequencies must be positive integers summing to 2**precision")
