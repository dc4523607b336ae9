"""A latent dataset opened from Python: indexed by key, iterated, batched, sharded and shuffled,
decoded on the fly through the same codec as the decode job (no images written to disk).

    import latentpack
    ds = latentpack.open("latents/")            # the manifest checked, the model found as decode finds it
    len(ds), ds.keys[:3], ds.label_names
    record = ds["cat-0001"]                      # {"key", "image" (uint8 HxWxC), "label", other columns}
    for batch in ds.iter_batches(64, shuffle=True, seed=0, shard=(0, 2)):
        batch["images"], batch["keys"], batch["labels"]

The unit of reading is a Parquet row group (at most 65,536 rows or about 64 MB): a key lookup
reads the one row group that holds it (the last few are kept), and iteration decodes chunks of
rows on a few threads (TensorFlow and the entropy coder release the GIL) with a bounded number of
decoded chunks waiting. A shuffled epoch permutes the row groups, then the rows inside each, from
`seed` and `epoch`; `shard=(i, n)` takes every n-th row of that order, so n shards see every row
exactly once between them, in the same order as one reader would.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import posixpath
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import LatentpackError
from pipeline.images import DeadLetter

# Rows decoded together: enough to amortize the model's call, small enough to bound memory.
CHUNK_ROWS = 256
# Row groups kept after a key lookup (a few lookups in one region read it once).
CACHED_GROUPS = 4


@dataclasses.dataclass(frozen=True)
class _Group:
    part: int
    index: int  # the row group within its part
    start: int  # its first row within the part
    rows: int


class LatentDataset:
    """A complete latent dataset (from `latentpack encode`), opened for reading. See the module's doc.

    `errors`: "raise" (a row whose code does not decode raises LatentpackError naming its key and
    reason) or "skip" (it is left out and recorded in `dead_letters`)."""

    def __init__(self, path: str, model: Optional[str] = None, checksums: bool = False, errors: str = "raise",
                 workers: int = 2):
        from apache_beam.io.filesystems import FileSystems

        from pipeline import latents
        from pipeline.artifact import read_spec
        from pipeline.decode import check_dataset, model_for, pixel_limit
        from pipeline.completion import read_manifest

        if errors not in ("raise", "skip"):
            raise LatentpackError(f"errors must be 'raise' or 'skip' (got {errors!r})")
        self.path = path.rstrip("/")
        self.manifest = read_manifest(self.path)
        self.model_dir = model_for(self.path, self.manifest, model)
        self.spec = read_spec(self.model_dir)
        self._paths, entries = check_dataset(self.path, self.spec, self.manifest)
        if checksums:
            latents.require_intact(self.path, self._paths, entries, checksums=True)
        self.max_pixels = pixel_limit(None, self.manifest)
        self.errors, self.workers = errors, max(1, int(workers))
        self.dead_letters: List[DeadLetter] = []
        self._open = FileSystems.open
        self._groups: List[_Group] = []
        for part, p in enumerate(self._paths):
            with self._open(p) as f:
                meta = pq.ParquetFile(f).metadata
            start = 0
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                if rows:
                    self._groups.append(_Group(part, g, start, rows))
                start += rows
        self._key_index: Optional[Dict[str, Tuple[int, int]]] = None
        self._keys: Optional[List[str]] = None
        self._labels: Optional[np.ndarray] = None
        self._cache: "collections.OrderedDict[Tuple[int, int], pa.Table]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self._codec = None
        from pipeline.codec import codec_class

        fmt = latents.metadata_of(self.schema).get("latent_format", "int") if self._paths else "int"
        self.codec_columns = {f.name for f in codec_class(self.spec).fields(self.spec, fmt)}

    # --- pickling (a DataLoader's spawned workers, Beam, Dask): the model and caches reload there ---
    def __getstate__(self):
        state = dict(self.__dict__)
        for name in ("_codec", "_lock", "_cache", "_open"):
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        from apache_beam.io.filesystems import FileSystems

        self.__dict__.update(state)
        self._codec, self._lock, self._cache = None, threading.Lock(), collections.OrderedDict()
        self._open = FileSystems.open

    # --- facts -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(g.rows for g in self._groups)

    def __repr__(self) -> str:
        return (f"LatentDataset({self.path!r}: {len(self)} images, {len(self._paths)} parts, "
                f"model {self.spec.family} {self.spec.fingerprint[:19]}…)")

    @property
    def schema(self) -> pa.Schema:
        with self._open(self._paths[0]) as f:
            return pq.read_schema(f)

    @property
    def label_names(self) -> Optional[List[str]]:
        return self.manifest.get("label_names")

    @property
    def extra_fields(self) -> List[pa.Field]:
        """The source's other columns kept beside the codes (a caption, an id, ...), as records name
        them: every record holds them after key, image and label ([] when the input had none)."""
        from pipeline.decode import given_back

        wanted = self.manifest.get("extra_columns") or []
        found: Dict[str, pa.Field] = {}
        for path in self._paths if wanted else []:  # a part stores those it holds values of
            with self._open(path) as f:
                for field in given_back(pq.read_schema(f)):
                    found.setdefault(field.name, field)
            if len(found) >= len(wanted):
                break
        return list(found.values())

    @property
    def keys(self) -> List[str]:
        """Every key, in the dataset's order (parts in the manifest's order, rows sorted by key
        inside each part); a key stored twice (only a hand-made dataset has one) appears twice."""
        self._index()
        return list(self._keys)

    @property
    def labels(self) -> np.ndarray:
        """The label of every row in `keys` order (-1 where a row has none)."""
        self._index()
        return self._labels.copy()

    def __contains__(self, key: str) -> bool:
        return key in self._index()

    def _index(self) -> Dict[str, Tuple[int, int]]:
        """key -> (part, row), built on first use from the key and label columns alone."""
        with self._lock:
            if self._key_index is None:
                keys, labels, index = [], [], {}
                for part, p in enumerate(self._paths):
                    with self._open(p) as f:
                        table = pq.read_table(f, columns=["key", "label"])
                    part_keys = table.column("key").to_pylist()
                    for row, key in enumerate(part_keys):
                        index.setdefault(key, (part, row))  # the first row of a key, as decode keeps it
                    keys.extend(part_keys)
                    labels.append(table.column("label").fill_null(-1).to_numpy().astype(np.int64))
                self._keys, self._key_index = keys, index
                self._labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
            return self._key_index

    # --- one record ------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> dict:
        if not isinstance(key, str):
            raise TypeError(f"a latent dataset is indexed by key (str), not {type(key).__name__}")
        where = self._index().get(key)
        if where is None:
            raise KeyError(key)
        part, row = where
        starts = [g.start for g in self._groups if g.part == part]
        groups = [g for g in self._groups if g.part == part]
        group = groups[bisect.bisect_right(starts, row) - 1]
        table = self._group_table(group).slice(row - group.start, 1)
        records = self._decode(table, raise_errors=True)
        return records[0]

    def get(self, key: str, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def _group_table(self, group: _Group) -> pa.Table:
        name = (group.part, group.index)
        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name]
        with self._open(self._paths[group.part]) as f:
            table = pq.ParquetFile(f).read_row_group(group.index)
        with self._lock:
            self._cache[name] = table
            while len(self._cache) > CACHED_GROUPS:
                self._cache.popitem(last=False)
        return table

    # --- decoding ----------------------------------------------------------------------------------
    @property
    def codec(self):
        """The model, loaded on first use (once per process, shared with the jobs' workers)."""
        if self._codec is None:
            from pipeline.codec import shared_codec

            self._codec = shared_codec(self.model_dir, self.spec)
        return self._codec

    def _decode(self, table: pa.Table, raise_errors: bool = False) -> List[dict]:
        """Rows -> records in the rows' order; a row that does not decode raises or is recorded."""
        extra = [n for n in table.column_names if n not in self.codec_columns and n not in ("key", "label")]
        named = _given_names(table.schema)
        by_key: Dict[str, np.ndarray] = {}
        keys = table.column("key").to_pylist()
        labels = table.column("label").fill_null(-1).to_numpy().astype(np.int64)
        for item in self.codec.decompress(table, self.max_pixels):
            if isinstance(item, DeadLetter):
                letter = dataclasses.replace(item, source=item.source or self.path)
                if raise_errors or self.errors == "raise":
                    raise LatentpackError(f"{self.path}: the row of key {letter.key!r} does not decode "
                                          f"({letter.reason}: {letter.error})")
                with self._lock:
                    self.dead_letters.append(letter)
                continue
            by_key.update(zip(item.keys, item.images))
        records = []
        for i, key in enumerate(keys):
            if key not in by_key:
                continue
            record = {"key": key, "image": by_key[key], "label": int(labels[i])}
            for name in extra:
                record[named.get(name, name)] = table.column(name)[i].as_py()
            records.append(record)
        return records

    def __iter__(self) -> Iterator[dict]:
        """Every record in the dataset's order."""
        for batch in self._chunks(shuffle=False, seed=0, epoch=0, shard=(0, 1)):
            yield from batch

    def records(self, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                shard: Tuple[int, int] = (0, 1)) -> Iterator[dict]:
        """Records one at a time, optionally shuffled and sharded (see iter_batches)."""
        for batch in self._chunks(shuffle, seed, epoch, shard):
            yield from batch

    def iter_batches(self, batch_size: int = 64, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                     shard: Tuple[int, int] = (0, 1), drop_last: bool = False) -> Iterator[dict]:
        """Batches {"keys": [...], "images": uint8 [N, H, W, C] (a list when sizes differ), "labels":
        int64 [N]} (and any other stored column, as a list). `shuffle`: a permutation of row groups
        and of the rows inside each, from (`seed`, `epoch`); `shard=(i, n)`: every n-th row of that
        order (n readers together see every row once)."""
        if batch_size < 1:
            raise LatentpackError(f"batch_size must be at least 1 (got {batch_size})")
        pending: List[dict] = []
        for records in self._chunks(shuffle, seed, epoch, shard):
            pending.extend(records)
            while len(pending) >= batch_size:
                yield _collate(pending[:batch_size])
                pending = pending[batch_size:]
        if pending and not drop_last:
            yield _collate(pending)

    def order(self, shuffle: bool = False, seed: int = 0, epoch: int = 0,
              shard: Tuple[int, int] = (0, 1)) -> List[Tuple[_Group, np.ndarray]]:
        """The row groups to read, each with the rows (within it) this shard decodes, in order."""
        i, n = shard
        if not (isinstance(n, int) and isinstance(i, int) and n >= 1 and 0 <= i < n):
            raise LatentpackError(f"shard must be (i, n) with 0 <= i < n (got {shard!r})")
        rng = np.random.default_rng([seed, epoch]) if shuffle else None
        groups = [self._groups[j] for j in (rng.permutation(len(self._groups)) if shuffle
                                             else range(len(self._groups)))]
        plan, position = [], 0
        for group in groups:
            rows = rng.permutation(group.rows) if shuffle else np.arange(group.rows)
            mine = rows[(np.arange(position, position + group.rows) % n) == i]
            position += group.rows
            if len(mine):
                plan.append((group, mine))
        return plan

    def _chunks(self, shuffle, seed, epoch, shard) -> Iterator[List[dict]]:
        """Decoded chunks of records, in order, decoded on `workers` threads with at most
        2 x workers chunks in flight."""
        jobs = []
        for group, rows in self.order(shuffle, seed, epoch, shard):
            for start in range(0, len(rows), CHUNK_ROWS):
                jobs.append((group, rows[start:start + CHUNK_ROWS]))
        if not jobs:
            return

        def work(job):
            group, rows = job
            with self._open(self._paths[group.part]) as f:
                table = pq.ParquetFile(f).read_row_group(group.index)
            return self._decode(table.take(pa.array(rows)))

        with ThreadPoolExecutor(self.workers, thread_name_prefix="latentpack-read") as pool:
            futures = collections.deque()
            jobs_iter = iter(jobs)
            for job in jobs_iter:
                futures.append(pool.submit(work, job))
                if len(futures) >= 2 * self.workers:
                    break
            while futures:
                done = futures.popleft().result()
                nxt = next(jobs_iter, None)
                if nxt is not None:
                    futures.append(pool.submit(work, nxt))
                yield done

    # --- adapters ----------------------------------------------------------------------------------
    def to_torch(self, shuffle: bool = False, seed: int = 0):
        """A `torch.utils.data.IterableDataset` of records ({"key", "image" as a uint8 tensor HxWxC,
        "label"}) that splits the rows between a DataLoader's workers (each sees its shard of
        every epoch; `set_epoch(e)` reshuffles). Workers must be spawned, not forked (TensorFlow
        does not survive a fork): `DataLoader(..., multiprocessing_context="spawn")`, as
        `torch_loader` makes it; a forked worker stops with that advice instead of hanging."""
        from latentpack.adapters import TorchDataset

        return TorchDataset(self, shuffle, seed)

    def torch_loader(self, batch_size: int = 64, num_workers: int = 2, shuffle: bool = False, seed: int = 0,
                     **kwargs):
        """A `torch.utils.data.DataLoader` over `to_torch()`, workers spawned, batches collated as
        {"keys", "images" (uint8 [N, H, W, C], or a list when sizes differ), "labels"}."""
        from latentpack.adapters import torch_loader

        return torch_loader(self, batch_size, num_workers, shuffle, seed, **kwargs)

    def to_tf_dataset(self, shuffle: bool = False, seed: int = 0, epoch: int = 0):
        """A `tf.data.Dataset` of {"key", "image" (uint8 [H, W, C]), "label"} and the source's other
        columns of scalar types (strings, bytes, numbers, booleans), prefetched (AUTOTUNE)."""
        from latentpack.adapters import tf_dataset

        return tf_dataset(self, shuffle, seed, epoch)

    def to_hf(self, shuffle: bool = False, seed: int = 0):
        """A Hugging Face `datasets.IterableDataset` of {"key", "image" (PIL), "label"} and the
        source's other columns, typed as they were."""
        from latentpack.adapters import hf_dataset

        return hf_dataset(self, shuffle, seed)


def _given_names(schema: pa.Schema) -> Dict[str, str]:
    """{stored name: name records give} of a part's extra columns (`pipeline.decode.given_names`)."""
    from pipeline.decode import given_names

    try:
        return given_names(schema)
    except LatentpackError:  # a table without the latentpack metadata: its columns as stored
        return {}


def _collate(records: Sequence[dict]) -> dict:
    images = [r["image"] for r in records]
    same = len({im.shape for im in images}) == 1
    batch = {"keys": [r["key"] for r in records], "images": np.stack(images) if same else images,
             "labels": np.array([r["label"] for r in records], np.int64)}
    for name in records[0]:
        if name not in ("key", "image", "label"):
            batch[name] = [r.get(name) for r in records]
    return batch


def open(path: str, model: Optional[str] = None, checksums: bool = False, errors: str = "raise",
         workers: int = 2) -> LatentDataset:  # noqa: A001  (latentpack.open, like io.open)
    """Open a latent dataset written by `latentpack encode`. `model`: the artifact folder or shipped
    name (default: the one that encoded it, as `decode` finds it); `checksums`: verify every part's
    CRC32C first (as `latentpack verify` does); `workers`: decoding threads."""
    return LatentDataset(path, model=model, checksums=checksums, errors=errors, workers=workers)
