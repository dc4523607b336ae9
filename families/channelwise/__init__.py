"""The channelwise family: the spatial transforms with a channel-conditional mean-scale prior (ms2020)."""
from families.base import Family
from families.channelwise.spec import parse
from families.spatial import describe

FAMILY = Family(name="channelwise", parse=parse, codec="families.channelwise.codec:ChannelwiseCodec",
                describe=describe, trainer="families.channelwise.train", archs=("channelwise",), format_version=4,
                since=4, color="C9")
