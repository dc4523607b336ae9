"""The codec spec: `codec.json` read once, validated, and passed down as one immutable object.

    spec = CodecSpec.from_dict(json.load(open("model/codec.json")), where="model/codec.json")
    spec.family, spec.fingerprint, spec.entropy_model, spec.section, spec.latent_channels, ...

The fields every artifact has are read here; the rest belongs to its model family, whose
`families/<name>/spec.py` reads it into a typed section (`spec.section`, whose fields also read
as attributes of the spec: `spec.stride`). Format version 1 (latentpack 0.1) knows one family,
`dense`, and no `family` field; version 2 adds `family` (spatial and hyperprior); 3 a dense
mixture prior; 4 the channelwise family. Every version still loads.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import families
from pipeline.errors import LatentpackError
from pipeline.fields import Fields, FrozenDict, freeze, thaw

FORMAT = "latentpack-codec"
# The newest codec.json format this latentpack reads. An artifact is written with its family's
# own version (`Family.format_version`: 3, or 4 for channelwise), so that an older reader refuses
# only what it cannot read.
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
LATENT_DTYPES = ("int8", "int16")
# Fields of the families' sections, which read as None on a spec of another family.
_SECTION_FIELDS = ("image_shape", "latent_dim", "quantization", "stride", "channels", "latent_channels",
                   "hyper_channels")


@dataclasses.dataclass(frozen=True)
class CodecSpec:
    """Everything the pipeline knows about a model artifact, typed."""

    format_version: int
    family: str
    fingerprint: str
    architecture: FrozenDict
    latent_dtype: str
    section: Any  # the family's own fields: a frozen dataclass of its spec.py
    entropy_model: Optional[FrozenDict] = None
    metrics: FrozenDict = dataclasses.field(default_factory=FrozenDict)
    training: FrozenDict = dataclasses.field(default_factory=FrozenDict)

    def __getattr__(self, name):  # only for names that are not fields: the section's
        if name.startswith("__") or name == "section":
            raise AttributeError(name)
        if hasattr(self.section, name):
            return getattr(self.section, name)
        if name in _SECTION_FIELDS:
            return None
        raise AttributeError(name)

    @property
    def arch(self) -> str:
        return self.architecture["arch"]

    @property
    def entropy_coded(self) -> bool:
        return self.entropy_model is not None

    def to_dict(self) -> dict:
        """The codec.json fields, as plain JSON values."""
        out = {"format": FORMAT}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "section":
                out.update({f.name: thaw(getattr(value, f.name)) for f in dataclasses.fields(value)
                            if getattr(value, f.name) is not None})
            elif value is not None:
                out[field.name] = thaw(value)
        return out

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> "CodecSpec":
        """Validate a parsed codec.json; raises LatentpackError naming the file and the field."""
        if not isinstance(raw, dict):
            raise LatentpackError(f"{where}: expected a JSON object")
        fields = Fields(raw, where)
        fields.need("format", str, lambda v: v == FORMAT)
        version = fields.need("format_version", int, lambda v: v in READABLE_VERSIONS)
        if version == 1:
            if "family" in raw:
                raise LatentpackError(f"{where}: 'family' is a version-2 field")
            name = "dense"
        else:
            name = fields.need("family", str, lambda v: v in families.names())
        declared = families.family(name)
        if version < declared.since:
            raise LatentpackError(f"{where}: a {name} model needs format_version {declared.since} or newer")
        section, entropy_model = declared.parse(fields)
        return cls(format_version=version, family=name,
                   fingerprint=fields.need("fingerprint", str, lambda v: v.startswith("sha256:")),
                   architecture=freeze(fields.need("architecture", dict, lambda v: isinstance(v.get("arch"), str))),
                   latent_dtype=fields.need("latent_dtype", str, lambda v: v in LATENT_DTYPES),
                   section=section, entropy_model=None if entropy_model is None else freeze(entropy_model),
                   metrics=freeze(raw.get("metrics") or {}), training=freeze(raw.get("training") or {}))
