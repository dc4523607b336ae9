"""A LatentDataset as the data-loading types of PyTorch, TensorFlow and Hugging Face `datasets`
(each imported only when its adapter is asked for: torch is an optional extra)."""
from __future__ import annotations

import os
import sys

import numpy as np


class TorchDataset:
    """Built by `LatentDataset.to_torch` (a torch IterableDataset subclass is made on first use,
    so that this module imports without torch)."""

    def __new__(cls, ds, shuffle: bool = False, seed: int = 0):
        return _torch_class()(ds, shuffle, seed)


_TORCH_CLASS = None


def _torch_class():
    global _TORCH_CLASS
    if _TORCH_CLASS is None:
        from torch.utils.data import IterableDataset

        _TORCH_CLASS = type("LatentTorchDataset", (_TorchRecords, IterableDataset), {})
        _TORCH_CLASS.__module__ = __name__
        globals()["LatentTorchDataset"] = _TORCH_CLASS  # picklable by name for spawned workers
    return _TORCH_CLASS


class _TorchRecords:
    """In a DataLoader with W workers, worker w decodes shard (w, W) of the epoch's order, so the
    workers together yield every row once per epoch."""

    def __init__(self, ds, shuffle: bool = False, seed: int = 0):
        self.ds, self.shuffle, self.seed, self.epoch = ds, shuffle, seed, 0
        self._pid, self._pickled = os.getpid(), False

    def __getstate__(self):
        return {"ds": self.ds, "shuffle": self.shuffle, "seed": self.seed, "epoch": self.epoch}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pid, self._pickled = os.getpid(), True

    def __reduce__(self):
        return (_rebuild, (self.__getstate__(),))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.ds)

    def __iter__(self):
        import torch
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        if info is not None and not self._pickled and os.getpid() != self._pid and "tensorflow" in sys.modules:
            from pipeline.errors import LatentpackError

            raise LatentpackError("a DataLoader worker was forked from a process running TensorFlow, which "
                                  "would hang: pass multiprocessing_context='spawn' to the DataLoader, or use "
                                  "LatentDataset.torch_loader(...)")
        shard = (info.id, info.num_workers) if info is not None else (0, 1)
        for record in self.ds.records(shuffle=self.shuffle, seed=self.seed, epoch=self.epoch, shard=shard):
            out = dict(record)
            out["image"] = torch.from_numpy(np.ascontiguousarray(record["image"]))
            yield out


def _rebuild(state):
    dataset = _torch_class().__new__(_torch_class())
    dataset.__setstate__(state)
    return dataset


def collate(records):
    """Records -> {"keys", "images" (a uint8 tensor [N, H, W, C], or a list when sizes differ), "labels"}."""
    import torch

    images = [r["image"] for r in records]
    same = len({tuple(im.shape) for im in images}) == 1
    return {"keys": [r["key"] for r in records], "images": torch.stack(images) if same else images,
            "labels": torch.tensor([r["label"] for r in records], dtype=torch.int64)}


def torch_loader(ds, batch_size: int, num_workers: int, shuffle: bool, seed: int, **kwargs):
    from torch.utils.data import DataLoader

    if num_workers > 0:
        kwargs.setdefault("multiprocessing_context", "spawn")
        kwargs.setdefault("persistent_workers", False)
    return DataLoader(TorchDataset(ds, shuffle, seed), batch_size=batch_size, num_workers=num_workers,
                      collate_fn=kwargs.pop("collate_fn", collate), **kwargs)


def tf_dataset(ds, shuffle: bool = False, seed: int = 0, epoch: int = 0):
    import tensorflow as tf

    extra = {f.name: _tf_scalar(f.type) for f in ds.extra_fields}
    extra = {name: dtype for name, dtype in extra.items() if dtype is not None}

    def records():
        for record in ds.records(shuffle=shuffle, seed=seed, epoch=epoch):
            out = {"key": record["key"], "image": record["image"], "label": record["label"]}
            for name, dtype in extra.items():  # a null becomes the type's zero (tf has no nulls)
                value = record.get(name)
                out[name] = value if value is not None else (b"" if dtype == tf.string else 0)
            yield out

    signature = {"key": tf.TensorSpec((), tf.string), "image": tf.TensorSpec((None, None, None), tf.uint8),
                 "label": tf.TensorSpec((), tf.int64), **{n: tf.TensorSpec((), d) for n, d in extra.items()}}
    return tf.data.Dataset.from_generator(records, output_signature=signature).prefetch(tf.data.AUTOTUNE)


def _tf_scalar(arrow_type):
    """The tf dtype of an Arrow scalar type, or None (lists, structs: not given to tf.data)."""
    import pyarrow as pa
    import tensorflow as tf

    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_binary(arrow_type) \
            or pa.types.is_large_binary(arrow_type):
        return tf.string
    if pa.types.is_boolean(arrow_type):
        return tf.bool
    if pa.types.is_integer(arrow_type):
        return tf.int64
    if pa.types.is_floating(arrow_type):
        return tf.float64
    return None


def hf_dataset(ds, shuffle: bool = False, seed: int = 0):
    import datasets
    import pyarrow as pa
    from PIL import Image

    names = [f.name for f in ds.extra_fields]

    def records():
        for record in ds.records(shuffle=shuffle, seed=seed):
            image = record["image"]
            yield {"key": record["key"], "image": Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image),
                   "label": record["label"], **{name: record.get(name) for name in names}}

    features = datasets.Features({"key": datasets.Value("string"), "image": datasets.Image(),
                                  "label": datasets.Value("int64"),
                                  **datasets.Features.from_arrow_schema(pa.schema(ds.extra_fields))})
    return datasets.IterableDataset.from_generator(records, features=features)
