"""How often the decode-side code check (`pipeline.entropy.CheckedReader`) catches a damaged code,
and what it costs: codes of the golden photos with one bit flipped, replaced by random bytes, cut
short, or with their tail zeroed (25 trials each per photo), decoded with photo:1 and photo:4.

    python scripts/code_check_rates.py     # docs/testing.md, "Damaged codes"
"""
import glob
import os
import time

import numpy as np
from PIL import Image
from pipeline.codec import load_codec
from pipeline import models
from pipeline.images import ImageBatch
import pipeline.entropy as E

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
rng = np.random.default_rng(0)
for m in ["photo:1", "photo:4"]:
    codec = load_codec(models.resolve(m))
    stats = {"flip": [0, 0], "random": [0, 0], "cut": [0, 0], "zero tail": [0, 0]}
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "golden", "photos", "upright", "*.png"))):
        img = np.asarray(Image.open(path).convert("RGB"))
        batch = ImageBatch(["a"], img[None], np.full(1,-1,np.int64), np.zeros(1,bool))
        code = codec.compress(batch, "code")["code"][0].as_py()
        def caught(b):
            try: codec.coder.decode(b, 5, 7); return 0
            except Exception: return 1
        for _ in range(25):
            i = int(rng.integers(len(code))); b = bytearray(code); b[i] ^= 1 << int(rng.integers(8))
            stats["flip"][0] += caught(bytes(b)); stats["flip"][1] += 1
            stats["random"][0] += caught(rng.integers(0,256,len(code),dtype=np.uint8).tobytes()); stats["random"][1] += 1
            n = int(rng.integers(len(code))); stats["cut"][0] += caught(code[:n]); stats["cut"][1] += 1
            stats["zero tail"][0] += caught(code[:n] + bytes(len(code)-n)); stats["zero tail"][1] += 1
    print(m, {k: f"{a}/{b}" for k, (a, b) in stats.items()}, flush=True)
# cost: decode time of photo:4 codes with and without the check, a 481x321 photo
codec = load_codec(models.resolve("photo:4"))
img = np.asarray(Image.open(sorted(glob.glob(os.path.join(ROOT, "..", "shared", "data", "bsds500", "*.jpg")))[0]).convert("RGB"))
batch = ImageBatch(["a"], img[None], np.full(1,-1,np.int64), np.zeros(1,bool))
code = codec.compress(batch, "code")["code"][0].as_py()
h, w = -(-img.shape[0]//16), -(-img.shape[1]//16)
def timeit(n=15):
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); codec.coder.decode(code, h, w); ts.append(time.perf_counter()-t)
    return np.median(ts)
checked = timeit()
orig_init = E.CheckedReader.__init__
def noecho(self, code, words=E.BIG):
    orig_init(self, code, words); self.echo = None
E.CheckedReader.__init__ = noecho
plain = timeit()
E.CheckedReader.__init__ = orig_init
checked2 = timeit()
print(f"entropy decode of one {img.shape[1]}x{img.shape[0]} photo ({len(code)} bytes): checked {1000*checked:.1f}/{1000*checked2:.1f} ms, unchecked {1000*plain:.1f} ms (medians of 15)")
