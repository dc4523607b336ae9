"""The architecture as rules a test can check: the import graph between latentpack's own modules
has no cycles, `pipeline/` never imports `training/`, no code outside the family registry
compares family names, and a new family needs only its folder and a registry entry."""
import ast
import json
import os
import re
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("latentpack", "pipeline", "training", "families")


def _modules():
    """{module name: path} of every module of the packages."""
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return found


def _imports(path, module, known):
    """The package modules a module imports, at module level or inside functions."""
    tree = ast.parse(open(path).read())
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def _graph():
    known = _modules()
    return {m: _imports(p, m, known) for m, p in known.items()}


def test_the_module_import_graph_has_no_cycles():
    graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_pipeline_never_imports_training():
    """Nothing the jobs can load -- pipeline/, the registry, each family's declaration and codec, and
    all they import, lazily or not -- imports training/."""
    import families

    graph = _graph()
    roots = [m for m in graph if m.startswith("pipeline") or m in ("families", "families.base")]
    for name in families.names():
        roots += [families.REGISTRY[name], families.family(name).codec.partition(":")[0]]
    seen, todo, via = set(), list(roots), {}
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        for n in graph.get(m, ()):
            via.setdefault(n, m)
            todo.append(n)
    reached = {m: via[m] for m in seen if m.startswith("training")}
    assert not reached, f"training modules the jobs can import (module: imported by): {reached}"


def test_no_family_name_is_compared_outside_its_folder():
    names = "dense|spatial|hyperprior|channelwise"
    pattern = re.compile(rf"""(==|!=|\bin)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    found = []
    for module, path in _modules().items():
        if module.startswith("families"):
            continue
        for i, line in enumerate(open(path), 1):
            if pattern.search(line):
                found.append(f"{path}:{i}: {line.strip()}")
    assert not found, "\n".join(found)


TOY_FAMILY = '''
"""A toy family: 4x4 block means, one byte each (what a registry entry and a folder need)."""
import dataclasses

import numpy as np
import pyarrow as pa

from families.base import Family
from pipeline.codec import ModelCodec, row_labels
from pipeline.images import DeadLetter, ImageBatch


@dataclasses.dataclass(frozen=True)
class ToySection:
    block: int


def parse(fields):
    return ToySection(block=fields.need("block", int, lambda v: v > 0)), None


class ToyCodec(ModelCodec):
    @classmethod
    def fields(cls, spec, latent_format):
        return [pa.field("latent", pa.binary(), nullable=False), pa.field("height", pa.int32(), nullable=False),
                pa.field("width", pa.int32(), nullable=False)]

    @classmethod
    def default_latent_format(cls, spec):
        return "int"

    def compress(self, batch, latent_format, refine=0):
        out = self._encode(images=batch.images)["latent"].numpy()
        n, h, w = batch.images.shape[:3]
        return {"latent": pa.array([x.tobytes() for x in out], pa.binary()),
                "height": pa.array(np.full(n, h, np.int32)), "width": pa.array(np.full(n, w, np.int32))}

    def decompress(self, table, max_pixels=0):
        keys = table.column("key").to_pylist()
        labels, has = row_labels(table)
        for i, key in enumerate(keys):
            h, w = table.column("height")[i].as_py(), table.column("width")[i].as_py()
            b = self.spec.block
            raw = np.frombuffer(table.column("latent")[i].as_py(), np.uint8)
            if raw.size != (h // b) * (w // b) * 3:
                yield DeadLetter(key, "", i, "bad_code", "wrong length")
                continue
            image = self._decode(latent=raw.reshape(1, h // b, w // b, 3))["image"].numpy()
            yield ImageBatch([key], image, labels[i:i + 1], has[i:i + 1])


FAMILY = Family(name="toy", parse=parse, codec=__name__ + ":ToyCodec", describe=lambda meta: "toy blocks",
                format_version=4, since=4)
'''


def _toy_artifact(folder):
    """A SavedModel of the toy family: encode = 4x4 block means (uint8), decode = their repetition."""
    import tensorflow as tf

    from training.export import write_codec_json

    class Toy(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
        def encode(self, images):
            x = tf.nn.avg_pool2d(tf.cast(images, tf.float32), 4, 4, "VALID")
            return {"latent": tf.cast(tf.round(x), tf.uint8)}

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="latent")])
        def decode(self, latent):
            x = tf.repeat(tf.repeat(latent, 4, axis=1), 4, axis=2)
            return {"image": x}

    module = Toy()
    tf.saved_model.save(module, folder, signatures={"encode": module.encode, "decode": module.decode})
    write_codec_json(folder, {"family": "toy", "block": 4, "latent_dtype": "int8",
                              "architecture": {"arch": "toy"}})


def test_a_toy_family_joins_through_the_registry_alone(tmp_path, monkeypatch):
    """One folder (outside the package) and one registry entry: encode and decode run with it."""
    import families
    from PIL import Image

    from latentpack import cli
    from pipeline.completion import read_manifest

    plugin = tmp_path / "plugins" / "toyfamily"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text(textwrap.dedent(TOY_FAMILY))
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    monkeypatch.setitem(families.REGISTRY, "toy", "toyfamily")
    model = str(tmp_path / "model")
    _toy_artifact(model)
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 6, 5, 3)).astype(np.uint8)
    for i, b in enumerate(blocks):  # blocky images: the toy codec keeps them exactly
        Image.fromarray(np.repeat(np.repeat(b, 4, axis=0), 4, axis=1)).save(photos / f"p{i}.png")
    latents, decoded = str(tmp_path / "latents"), str(tmp_path / "decoded")
    assert cli.main(["encode", "--input", str(photos / "*.png"), "--input-format", "images", "--model-dir", model,
                     "--output", latents, "--runner=FnApiRunner"]) == 0
    assert read_manifest(latents)["images"] == 3
    assert cli.main(["decode", "--input", latents, "--model-dir", model, "--output", decoded,
                     "--runner=FnApiRunner"]) == 0
    for i in range(3):
        original = np.asarray(Image.open(photos / f"p{i}.png"))
        assert np.array_equal(np.asarray(Image.open(os.path.join(decoded, f"p{i}.png"))), original)
    with open(os.path.join(model, "codec.json")) as f:
        assert json.load(f)["format_version"] == 4
