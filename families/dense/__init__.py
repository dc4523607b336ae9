"""The dense family: a fixed image shape, one latent vector per image (MNIST digits, thumbnails)."""
from families.base import Family
from families.dense.spec import parse


def describe(meta: dict) -> str:
    return (f"{meta['latent_dim']} x {meta['latent_dtype']}, {meta['quantization_bits']}-bit, "
            f"images {'x'.join(map(str, meta['image_shape']))}")


FAMILY = Family(name="dense", parse=parse, codec="families.dense.codec:DenseCodec", describe=describe,
                trainer="families.dense.train", archs=("conv", "mlp"), since=1, color="C1")
