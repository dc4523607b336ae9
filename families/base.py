"""What a model family declares (`families/<name>/__init__.py` holds one `Family`)."""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Optional, Tuple


def _load(path: str):
    module, _, name = path.partition(":")
    found = importlib.import_module(module)
    return getattr(found, name) if name else found


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: its name in codec.json and everything the rest of latentpack asks of it.

    `parse(raw, where)` reads the family's fields of a codec.json dict into its typed section (a
    frozen dataclass; `pipeline.spec.CodecSpec.section`), raising LatentpackError naming `where`
    and the field. `codec` and `trainer` are "module:attribute" paths, loaded on first use: the
    `pipeline.codec.ModelCodec` subclass, and the module whose `main(args)` trains and exports
    (for the `archs` of `latentpack train --arch`); artifacts are written with `format_version`,
    and read from `since` on. `describe(meta)` is inspect's summary of the
    model from a dataset part's metadata; `color` its curves' colour in `evaluate`'s plots;
    `weights` ("module:function", optional) turns an artifact back into a trainer's weights
    (`python -m training.weights`)."""

    name: str
    parse: Callable
    codec: str
    describe: Callable[[dict], str]
    trainer: Optional[str] = None
    archs: Tuple[str, ...] = ()
    format_version: int = 3  # the codec.json format its artifacts are written with
    since: int = 2  # the first format that knew it
    color: str = "k"
    weights: Optional[str] = None

    def codec_class(self):
        return _load(self.codec)

    def trainer_module(self):
        if self.trainer is None:
            from pipeline.errors import LatentpackError
            raise LatentpackError(f"the {self.name} family cannot be trained here")
        return _load(self.trainer)

    def weights_from_artifact(self, model_dir: str):
        if self.weights is None:
            from pipeline.errors import LatentpackError
            raise LatentpackError(f"{model_dir}: weights cannot be recovered from a {self.name} artifact")
        return _load(self.weights)(model_dir)
