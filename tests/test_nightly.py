"""The scheduled job users run (examples/nightly/latentpack-nightly, from cron): three nights of
arriving shards, each encoded once, the dataset complete and verified after every night."""
import json
import os
import subprocess
import sys
import time

from conftest import write_tfrecord

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NIGHTLY = os.path.join(ROOT, "examples", "nightly", "latentpack-nightly")


def night(settings, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([NIGHTLY, str(settings)], env=env, capture_output=True, text=True, timeout=600)


def nightly_settings(tmp_path, model_dir):
    """(incoming folder, latent dataset folder, settings file) of a nightly job on this machine."""
    incoming, latents = tmp_path / "incoming", tmp_path / "latents"
    incoming.mkdir()
    settings = tmp_path / "nightly.env"
    settings.write_text(
        f"LATENTPACK_INPUT='{incoming}/*.tfrecord'\n"
        f"LATENTPACK_OUTPUT={latents}\n"
        f"LATENTPACK_MODEL={model_dir}\n"
        f"LATENTPACK={os.path.join(os.path.dirname(sys.executable), 'latentpack')}\n"
        "LATENTPACK_BEAM_ARGS=--runner=FnApiRunner\n"
        f"LATENTPACK_LOCK={tmp_path / 'nightly.lock'}\n")
    return incoming, latents, settings


def test_nightly_wrapper_encodes_each_days_new_shards_once(tmp_path, mnist, model_dir):
    incoming, latents, settings = nightly_settings(tmp_path, model_dir)
    images = mnist[0]

    def arrive(day, n):
        write_tfrecord(incoming / f"day{day}.tfrecord", images[100 * day:100 * day + n],
                       keys=[f"day{day}/{i:03d}" for i in range(n)])

    arrive(1, 40)
    arrive(2, 30)
    first = night(settings)
    assert first.returncode == 0, first.stderr[-2000:]
    manifest = json.load(open(latents / "_manifest.json"))
    assert manifest["images"] == 70 and manifest["parts_this_run"] == 2
    assert f"ok: {latents}: 2 part(s), 70 images" in first.stdout

    arrive(3, 25)  # the next day's shard
    second = night(settings)
    assert second.returncode == 0, second.stderr[-2000:]
    manifest = json.load(open(latents / "_manifest.json"))
    assert manifest["images"] == 95 and manifest["parts_this_run"] == 1 and len(manifest["files"]) == 3

    third = night(settings)  # nothing new: reads nothing, still complete and verified
    assert third.returncode == 0, third.stderr[-2000:]
    manifest = json.load(open(latents / "_manifest.json"))
    assert manifest["images"] == 95 and manifest["parts_this_run"] == 0


def test_a_night_with_a_corrupt_file_keeps_the_earlier_nights(tmp_path, mnist, model_dir):
    """Night 1: two good shards. Night 2: a good shard and a truncated one: tonight's inputs are bad
    beyond --max-bad-fraction, so the night fails with status 3, its new parts are removed, and the
    dataset is exactly as night 1 sealed it (verify and decode work). Night 3: the corrupt file
    replaced: both of night 2's shards are encoded."""
    from pipeline import decode

    from conftest import BEAM_TEST_ARGS

    incoming, latents, settings = nightly_settings(tmp_path, model_dir)
    images = mnist[0]

    def arrive(name, start, n):
        write_tfrecord(incoming / f"{name}.tfrecord", images[start:start + n],
                       keys=[f"{name}/{i:03d}" for i in range(n)])

    arrive("a", 0, 20)
    arrive("b", 20, 20)
    first = night(settings)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "this run: 40 new images, 0 dead letters; the dataset: 40 images" in first.stdout
    sealed = open(latents / "_manifest.json").read()

    arrive("c", 40, 20)
    arrive("d", 60, 20)
    data = open(incoming / "d.tfrecord", "rb").read()
    open(incoming / "d.tfrecord", "wb").write(data[:-3])  # truncated in transfer: inside its last record
    second = night(settings)
    assert second.returncode == 3, second.stdout + second.stderr[-2000:]
    assert "tonight's new inputs were bad" in second.stderr and "this run:" in second.stderr
    assert open(latents / "_manifest.json").read() == sealed  # untouched
    failed = json.load(open(latents / "_failed.json"))
    assert failed["kept_manifest"] and failed["counts"]["dead_lettered"] > 0 and len(failed["removed_parts"]) == 2
    assert sorted(f for f in os.listdir(latents) if f.endswith(".parquet")) == sorted(
        f["name"] for f in json.loads(sealed)["files"])
    verified = subprocess.run([os.path.join(os.path.dirname(sys.executable), "latentpack"), "verify", str(latents)],
                              capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout
    assert decode.run(["--input", str(latents), "--model-dir", model_dir, "--output", str(tmp_path / "dec")]
                      + BEAM_TEST_ARGS)["counts"]["written"] == 40

    arrive("d", 60, 20)  # sent again, whole
    third = night(settings)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "this run: 40 new images, 0 dead letters; the dataset: 80 images" in third.stdout
    assert not (latents / "_failed.json").exists()


def test_nightly_wrapper_settings_mistakes_and_overlap(tmp_path, model_dir):
    settings = tmp_path / "nightly.env"
    settings.write_text(f"LATENTPACK_OUTPUT={tmp_path / 'out'}\n")
    proc = night(settings)
    assert proc.returncode == 2 and proc.stderr.strip() == "latentpack-nightly: error: LATENTPACK_INPUT is not set"

    settings.write_text(f"LATENTPACK_INPUT='{tmp_path}/none/*.tfrecord'\nLATENTPACK_OUTPUT={tmp_path / 'out'}\n"
                        f"LATENTPACK_MODEL={model_dir}\n"
                        f"LATENTPACK={os.path.join(os.path.dirname(sys.executable), 'latentpack')}\n"
                        f"LATENTPACK_LOCK={tmp_path / 'nightly.lock'}\n")
    proc = night(settings)
    assert proc.returncode == 2 and "latentpack: error: no files match --input" in proc.stderr

    # An earlier night still running (it holds the lock): this one does not start.
    holder = subprocess.Popen(["flock", str(tmp_path / "nightly.lock"), "sleep", "30"])
    try:
        while not (tmp_path / "nightly.lock").exists():
            time.sleep(0.05)
        time.sleep(0.3)
        proc = night(settings)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 75 and "still holds" in proc.stderr
