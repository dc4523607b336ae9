"""The spatial family: GDN transforms (bls2017), any image size, a per-channel prior."""
from families.base import Family
from families.spatial.spec import parse


def describe(meta: dict) -> str:
    return f"{meta.get('latent_channels')} latent channels, stride {meta.get('stride', 16)}, any image size"


FAMILY = Family(name="spatial", parse=parse, codec="families.spatial.codec:SpatialCodec", describe=describe,
                trainer="families.spatial.train", archs=("spatial",), color="C3")
