"""The hyperprior family: the spatial transforms with a scale hyperprior (bmshj2018)."""
from families.base import Family
from families.hyperprior.spec import parse
from families.spatial import describe

FAMILY = Family(name="hyperprior", parse=parse, codec="families.hyperprior.codec:HyperpriorCodec", describe=describe,
                trainer="families.hyperprior.train", archs=("hyperprior",), color="C1",
                weights="families.hyperprior.weights:from_artifact")
