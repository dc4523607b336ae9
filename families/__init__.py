"""Model families, one folder each, and the registry that is the only place naming them.

    from families import family
    family(spec.family).codec_class()     # the pipeline's codec of an artifact (families/<name>/codec.py)
    family.for_arch("hyperprior").trainer()  # the training side (families/<name>/train.py), by name

A family folder holds its declaration (`__init__.py`: a `Family`), how its part of codec.json
is read (`spec.py`), its codec (`codec.py`: compress/decompress, the inference half that
`pipeline/` loads) and its trainer and export (`train.py`: the half that `training/` loads). The
two halves are imported by name, lazily, so `pipeline/` never imports `training/`. Adding a
family is one folder and one line below (or `register` from outside the package: a plugin, a
test's toy family).
"""
from __future__ import annotations

import importlib
from typing import Dict, List

from families.base import Family
from pipeline.errors import LatentpackError

REGISTRY: Dict[str, str] = {
    "dense": "families.dense",
    "spatial": "families.spatial",
    "hyperprior": "families.hyperprior",
    "channelwise": "families.channelwise",
}


def register(name: str, module: str) -> None:
    """Make the family declared in `module` (its `FAMILY`) known under `name`."""
    REGISTRY[name] = module


def family(name: str) -> Family:
    """The declaration of a family, by the name codec.json gives it."""
    if name not in REGISTRY:
        raise LatentpackError(f"model family {name!r} is not known to this latentpack")
    declared = importlib.import_module(REGISTRY[name]).FAMILY
    if declared.name != name:
        raise LatentpackError(f"{REGISTRY[name]} declares family {declared.name!r}, registered as {name!r}")
    return declared


def names() -> List[str]:
    return list(REGISTRY)


def for_arch(arch: str) -> Family:
    """The family that `latentpack train --arch ARCH` trains."""
    for name in REGISTRY:
        if arch in family(name).archs:
            return family(name)
    raise LatentpackError(f"no model family trains --arch {arch!r} (known: {', '.join(archs())})")


def archs() -> List[str]:
    return [arch for name in REGISTRY for arch in family(name).archs]
