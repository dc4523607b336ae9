"""Entropy coding: frozen integer tables, exact round trips, and codes that never change."""
import json
import os
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import BEAM_TEST_ARGS
from pipeline import completion, decode, encode, entropy, latents
from pipeline.codec import load_codec, schema_of
from pipeline.artifact import read_spec
from pipeline.entropy import EntropyCoder
from pipeline.errors import LatentpackError
from families.dense.prior import FactorizedPrior, freeze
from training.prior import PRECISION, quantize_pmf

# A fixed model and fixed latents, and the codes they gave when the golden file was written.
# They must never change, on any machine, or datasets written elsewhere would stop decoding.
# Regenerate only on purpose: LATENTPACK_REGENERATE_GOLDEN=1 make test
GOLDEN_MODEL = {"kind": "factorized-logistic", "precision": 16, "offsets": [-2, 0, -1],
                "frequencies": [[1000, 20000, 30000, 14000, 536], [60000, 5536], [1, 32767, 32767, 1]]}
GOLDEN_LATENTS = np.array([[0, 0, 0], [2, 1, 1], [-2, 0, 2], [1, 1, -1], [-1, 0, 1], [0, 1, 0]])
GOLDEN_FILE = os.path.join(os.path.dirname(__file__), "golden", "entropy_codes.json")
# The same tables as set 0 of a mixture, with a second set that suits other latents.
GOLDEN_MIXTURE = dict(GOLDEN_MODEL, kind="factorized-mixture", weights=[40000, 25536], components=[
    GOLDEN_MODEL["frequencies"], [[100, 200, 5000, 30000, 30236], [5536, 60000], [30000, 1, 1, 35534]]])


def test_golden_codes_are_stable():
    """Today's codes (format 3) never change; format 2's (little-endian words) still decode."""
    coder = EntropyCoder(GOLDEN_MODEL)
    codes = [c.hex() for c in coder.encode(GOLDEN_LATENTS)]
    with open(GOLDEN_FILE) as f:
        golden = json.load(f)
    mixture = EntropyCoder(GOLDEN_MIXTURE)
    mixed = [c.hex() for c in mixture.encode(GOLDEN_LATENTS)]
    if os.environ.get("LATENTPACK_REGENERATE_GOLDEN"):
        golden["codes_format_3"] = codes
        golden["codes_mixture"] = mixed
        with open(GOLDEN_FILE, "w") as f:
            json.dump(golden, f, indent=1)
    assert golden["model"] == GOLDEN_MODEL and golden["latents"] == GOLDEN_LATENTS.tolist()
    assert codes == golden["codes_format_3"]
    assert np.array_equal(coder.decode([bytes.fromhex(c) for c in codes]), GOLDEN_LATENTS)
    old = [bytes.fromhex(c) for c in golden["codes_format_2"]]
    assert np.array_equal(coder.decode(old, entropy.LITTLE), GOLDEN_LATENTS)
    assert sum(map(len, old)) - sum(len(c) // 2 for c in codes) >= len(codes)  # a byte or more each
    # A mixture's codes name their table set first: pinned too, and each uses the set that codes it shortest.
    assert mixed == golden["codes_mixture"]
    assert np.array_equal(mixture.decode([bytes.fromhex(c) for c in mixed]), GOLDEN_LATENTS)
    chosen = mixture.choose(mixture.symbols(GOLDEN_LATENTS))
    assert set(chosen) == {0, 1}
    alone = [EntropyCoder(dict(GOLDEN_MODEL, frequencies=tables)).encode(GOLDEN_LATENTS)
             for tables in GOLDEN_MIXTURE["components"]]
    for i, k in enumerate(chosen):  # the chosen set's code is never longer than the other's (bar the set's name)
        assert len(alone[k][i]) <= len(alone[1 - k][i])


def test_a_mixture_prior_fits_latents_that_depend_on_each_other_and_codes_them_shorter():
    """Two kinds of images whose latents move together: one table set per kind beats one for all."""
    from families.dense.prior import add_mixture

    rng = np.random.default_rng(0)
    kind = rng.integers(0, 2, 4000)
    latents = np.where(kind[:, None] == 1, 3, -3) + rng.integers(-1, 2, (4000, 12))
    prior = FactorizedPrior(12)
    prior.build((None, 12))
    prior.loc.assign(np.zeros(12))
    prior.log_scale.assign(np.full(12, np.log(2.0)))
    base = freeze(prior)
    offsets = np.array(base["offsets"])
    model = add_mixture(base, latents[:3000] - offsets, components=4, seed=0)
    assert model["kind"] == "factorized-mixture" and model["components"][0] == base["frequencies"]
    assert len(model["components"]) == len(model["weights"]) == 4 and sum(model["weights"]) == 2 ** PRECISION
    one, mixed = EntropyCoder(base), EntropyCoder(model)
    held_out = latents[3000:]
    codes = mixed.encode(held_out)
    assert np.array_equal(mixed.decode(codes), held_out)
    assert sum(map(len, codes)) < 0.8 * sum(map(len, one.encode(held_out)))
    # Both kinds found their own set (besides set 0, the trained prior).
    assert len(set(mixed.choose(held_out - offsets).tolist())) >= 2
    # And the model passes the artifact's checks only while its tables are integers summing to 2**16.
    from families.dense.spec import validate_mixture
    validate_mixture(model, 12, "here")
    with pytest.raises(LatentpackError, match="invalid entropy_model"):
        validate_mixture(dict(model, weights=model["weights"][:-1] + [model["weights"][-1] + 1]), 12, "here")


def test_the_shortest_final_word_round_trips_and_saves_bytes():
    """Random streams of random tables, empty ones included, and both ends of `finish` (a point of
    the final interval, or constriction's own words where the interval passes 2**64)."""
    import constriction

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    from code_ends import measure, random_streams

    paths = set()
    for model, _, symbols in random_streams(np.random.default_rng(3), 3000):
        coder = constriction.stream.queue.RangeEncoder()
        coder.encode(symbols, model)
        _, (lower, size) = coder.pos()
        paths.add(lower + size <= 1 << 64)
        assert np.array_equal(entropy.reader(entropy.finish(coder)).decode(model, len(symbols)), symbols)
    assert paths == {True, False}
    r = measure(3000)  # what `python scripts/code_ends.py` reports, on fewer streams
    assert r["finish"] < r["constriction"] - 1.5 and r["finish"] < r["ideal"] + 1.0
    assert entropy.shortest_point(0x1234_5678_9000_0001, 0x1234_5679_0000_0000) == 0x1234_5678_C000_0000
    assert entropy.shortest_point(0, 1) == 0 and entropy.shortest_point(5, 6) == 5

    def slow(lower, upper):  # the definition, by search
        return next(p for bits in range(65, -1, -1) for p in [-(-lower // (1 << bits)) << bits] if p < upper)

    rng = np.random.default_rng(4)
    for _ in range(20000):
        lower = int(rng.integers(0, 1 << 62)) >> int(rng.integers(0, 62))
        upper = lower + 1 + (int(rng.integers(0, 1 << 62)) >> int(rng.integers(0, 62)))
        assert entropy.shortest_point(lower, upper) == slow(lower, upper)


def test_tables_are_exact_dyadic_probabilities():
    coder = EntropyCoder(GOLDEN_MODEL)
    for d, table in enumerate(GOLDEN_MODEL["frequencies"]):
        row = coder.probabilities[0, d, :len(table)]
        assert (row * 2 ** 16 == np.array(table)).all() and row.sum() == 1.0


def test_round_trip_random_latents():
    rng = np.random.default_rng(0)
    model = {"precision": 16, "offsets": [-20] * 8,
             "frequencies": [quantize_pmf(rng.random(41) ** 3).tolist() for _ in range(8)]}
    coder = EntropyCoder(model)
    latent = rng.integers(-20, 21, (500, 8))
    assert np.array_equal(coder.decode(coder.encode(latent)), latent)
    with pytest.raises(ValueError, match="outside"):
        coder.encode(np.full((1, 8), 21))


def test_quantize_pmf_sums_exactly_and_keeps_every_symbol():
    for pmf in [np.array([1.0]), np.array([1e-30, 1.0, 1e-30]), np.random.default_rng(1).random(300)]:
        freq = quantize_pmf(pmf)
        assert freq.sum() == 2 ** PRECISION and freq.min() >= 1


def test_freeze_gives_valid_tables_centred_on_the_prior():
    prior = FactorizedPrior(3)
    prior.build((None, 3))
    prior.loc.assign([0.0, 5.0, -3.0])
    prior.log_scale.assign(np.log([0.5, 2.0, 40.0]).astype(np.float32))
    frozen = freeze(prior)
    for d, (offset, table) in enumerate(zip(frozen["offsets"], frozen["frequencies"])):
        assert sum(table) == 2 ** 16 and len(table) <= 255
    # Narrow priors: the most likely value is the location.
    for d in (0, 1):
        assert abs(frozen["offsets"][d] + int(np.argmax(frozen["frequencies"][d])) - [0, 5][d]) <= 1
    # A prior too wide for a table is cut to 255 values around its location, tails folded into the ends.
    assert len(frozen["frequencies"][2]) == 255 and abs(frozen["offsets"][2] + 127 - (-3)) <= 1


def test_rd_artifact_codes_match_the_codec(rd_model_dir, mnist):
    codec = load_codec(rd_model_dir)
    spec = read_spec(rd_model_dir)
    assert spec.quantization["kind"] == "integer" and spec.training["lmbda"] == 0.02
    latent = codec.encode(mnist[0][:64])
    codes = codec.entropy.encode(latent)
    assert np.array_equal(codec.entropy.decode(codes), latent)
    assert 0 < np.mean([len(c) for c in codes]) < 40
    assert spec.metrics["val_code_bytes"] > 0


def test_code_dataset_round_trip(rd_model_dir, shards, tmp_path):
    lat, dec = str(tmp_path / "lat"), str(tmp_path / "dec")
    manifest = encode.run(["--input", shards.pattern, "--model-dir", rd_model_dir, "--output", lat] + BEAM_TEST_ARGS)
    assert manifest["latent_format"] == "code"
    table = pq.ParquetDataset(latents.part_paths(lat, manifest)).read().sort_by("key")
    assert table.schema.names == ["key", "code", "label"]
    # No min/max statistics for the codes (two whole codes per page and in the footer), keys keep theirs.
    for part in latents.part_paths(lat, manifest):
        chunk = pq.ParquetFile(part).metadata.row_group(0)
        assert chunk.column(1).path_in_schema == "code" and chunk.column(1).statistics is None
        assert chunk.column(0).statistics.has_min_max
        # No serialized Arrow schema in a code part's footer; the types and the codec metadata read back.
        assert b"ARROW:schema" not in pq.ParquetFile(part).metadata.metadata
        assert pq.read_schema(part).equals(schema_of(read_spec(rd_model_dir), "code"), check_metadata=False)
        assert latents.metadata_of(pq.read_schema(part))["format_version"] == latents.FORMAT_VERSION
    codec = load_codec(rd_model_dir)
    assert table.column("code").to_pylist() == codec.entropy.encode(codec.encode(shards.images))
    decode.run(["--input", lat, "--model-dir", rd_model_dir, "--output", dec, "--output-format", "npz"]
               + BEAM_TEST_ARGS)
    # The same images with the int format: codes lose nothing beyond quantization.
    lat_int = str(tmp_path / "lat-int")
    encode.run(["--input", shards.pattern, "--model-dir", rd_model_dir, "--output", lat_int,
                "--latent-format", "int"] + BEAM_TEST_ARGS)
    ints = pq.ParquetDataset(latents.part_paths(lat_int, completion.read_manifest(lat_int))).read().sort_by("key")
    assert np.array_equal(latents.latents_of(ints), codec.entropy.decode(table.column("code").to_pylist()))
    assert manifest["total_bytes"] < completion.read_manifest(lat_int)["total_bytes"]


def test_code_format_needs_an_entropy_model(model_dir, shards, tmp_path):
    with pytest.raises(LatentpackError, match="needs a model trained with --quality or --lambda"):
        encode.run(["--input", shards.pattern, "--model-dir", model_dir, "--output", str(tmp_path / "o"),
                    "--latent-format", "code"] + BEAM_TEST_ARGS)


def test_channel_coder_round_trip_with_a_one_symbol_channel():
    from pipeline.entropy import ChannelCoder

    model = {"precision": 16, "offsets": [-3, 5, -1],
             "frequencies": [[1000, 30000, 30000, 4536], [65536], [16384, 32768, 16384]]}
    coder = ChannelCoder(model)
    rng = np.random.default_rng(0)
    latent = np.stack([rng.integers(-3, 1, (5, 7)), np.full((5, 7), 5), rng.integers(-1, 2, (5, 7))], axis=-1)
    code = coder.encode(latent)
    assert np.array_equal(coder.decode(code, 5, 7), latent)
    # Values beyond a table are clipped to its ends; the constant channel decodes to its one value.
    wild = latent.copy()
    wild[0, 0] = [40, -9, 7]
    assert coder.decode(coder.encode(wild), 5, 7)[0, 0].tolist() == [0, 5, 1]
