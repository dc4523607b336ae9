"""Finding keys seen twice without any worker holding them all: the keys of each place (an input
shard, a dataset part) are grouped by a stable hash into buckets, one element per place and
bucket (its keys and their indexes, as two lists: cheap to pickle between workers), and each
bucket, once gathered, names every occurrence after the first (by place, then index). The encode
job runs it over its input shards (and the older parts of a `--skip-existing` folder), the decode
job over the parts it decodes."""
from __future__ import annotations

import zlib
from typing import Callable, Iterable, List, Optional, Tuple

from apache_beam.io.filesystems import FileSystems

BUCKETS = 16


def bucketed(place: str, entries: Iterable[Tuple[str, int]], buckets: int = BUCKETS,
             identity: Optional[Callable[[str], str]] = None) -> List[tuple]:
    """A place's (key, index) entries -> [(bucket, (place, keys, indexes))] for the non-empty
    buckets; keys of one `identity` (see `later_occurrences`) share a bucket."""
    out = [([], []) for _ in range(buckets)]
    for key, index in entries:
        found = out[zlib.crc32((identity(key) if identity else key).encode("utf-8", "surrogatepass")) % buckets]
        found[0].append(key)
        found[1].append(index)
    return [(b, (place, found[0], found[1])) for b, found in enumerate(out) if found[0]]


def stored_keys(part: str) -> List[str]:
    """The `key` column of a latent dataset part (keys only: no codes are read)."""
    import pyarrow.parquet as pq

    with FileSystems.open(part) as f:
        return pq.read_table(f, columns=["key"]).column("key").to_pylist()


def later_occurrences(bucket_entries, report: Callable[[str], bool] = lambda place: True,
                      identity: Optional[Callable[[str], str]] = None):
    """(bucket, [(place, keys, indexes)]) -> (place, (index, first (place, index))) for every
    occurrence of a key after its first, in the places `report` accepts. With `identity` (a key's
    file name as a filesystem that folds case tells it: `outputs.name_identity`), keys of one
    identity count as one key, and each later occurrence also names its first's key:
    (place, (index, (first place, first index, first's key)))."""
    _, groups = bucket_entries
    seen, repeated = {}, {}  # identity -> its first (place, index, key) met; -> all of them, when several
    for place, keys, indexes in groups:
        for key, index in zip(keys, indexes):
            name = identity(key) if identity else key
            where = (place, index, key)
            if name in seen:
                repeated.setdefault(name, [seen[name]]).append(where)
            else:
                seen[name] = where
    for places in repeated.values():
        first = min(places)  # groups arrive in any order: the first is the least (place, index)
        for place, index, _ in places:
            if (place, index) != first[:2] and report(place):
                yield place, (index, first if identity else first[:2])
