"""latentpack: image datasets stored as learned codes.

From Python (a dataset written by `latentpack encode`, decoded on the fly):

    import latentpack
    ds = latentpack.open("latents/")        # LatentDataset: len, keys, ds[key], iter_batches, to_torch, ...
    codes = latentpack.compress(images, model="photo:4"); images = latentpack.decompress(codes)

The `latentpack` command (latentpack/cli.py) sits above both packages: `training` (train and
export a model artifact) and `pipeline` (the Beam jobs that read it). Names are imported on
first use, so `import latentpack` stays light.
"""

__all__ = ["open", "LatentDataset", "compress", "decompress", "Codes"]


def __getattr__(name):
    if name in ("open", "LatentDataset"):
        from latentpack import dataset

        return getattr(dataset, name)
    if name in ("compress", "decompress", "Codes"):
        from latentpack import arrays

        return getattr(arrays, name)
    raise AttributeError(f"module 'latentpack' has no attribute {name!r}")
