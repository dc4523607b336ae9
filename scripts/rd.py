"""Train the quality presets on MNIST and measure them against PNG, JPEG and WebP.

    python scripts/rd.py --out rd-out          (what `make rd` runs)

Reads the 60,000 MNIST training images from ../shared/data/mnist (idx files),
keeps a seeded validation part out of training, trains `--quality` presets and the
reference MLP (resumable: a preset whose artifact exists is not trained again; one exported
before mixture priors gets its table sets fitted, `training.train.add_mixture_to`),
evaluates everything on the validation part with `latentpack evaluate`, and writes
the table and plot into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.join(ROOT, "..", "shared", "data", "mnist", "train-images-idx3-ubyte.gz")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="rd-out", help="work folder: models, validation set, results")
    p.add_argument("--qualities", type=int, nargs="+", default=list(range(1, 9)), help="presets to train")
    p.add_argument("--epochs", type=int, default=12, help="epochs per preset")
    p.add_argument("--long-epochs", type=int, default=40,
                   help="epochs for the widest preset (8), which is still improving after --epochs")
    p.add_argument("--train-limit", type=int, default=None, help="train on at most this many images")
    p.add_argument("--val", type=int, default=10000, help="validation images kept out of training")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on at most this many of them")
    p.add_argument("--mlp-epochs", type=int, default=50, help="epochs for the reference MLP")
    p.add_argument("--refine", type=int, nargs="+", default=[0, 50], metavar="STEPS",
                   help="evaluate the presets encoded with these steps of refinement (encode --refine), a curve each")
    args = p.parse_args(argv)
    if not os.path.exists(MNIST):
        sys.exit(f"rd: {MNIST} is missing; this benchmark needs the MNIST training set in ../shared/data/mnist")

    from latentpack import cli
    from pipeline.formats import load_images
    from families.dense.rd import LONG_PRESETS
    from pipeline.codec import load_codec
    from families.dense.export import add_refinement_to
    from families.dense.train import TrainConfig, add_mixture_to, train

    _, images, labels, _ = load_images(MNIST, "idx")
    order = np.random.default_rng(0).permutation(len(images))
    val_idx, train_idx = order[:args.val], order[args.val:]
    if args.train_limit:
        train_idx = train_idx[:args.train_limit]
    eval_idx = val_idx[:args.eval_limit] if args.eval_limit else val_idx
    os.makedirs(args.out, exist_ok=True)
    val_path = os.path.join(args.out, "val.npz")
    np.savez(val_path, images=images[eval_idx], labels=labels[eval_idx],
             keys=np.array([f"mnist/{i:05d}" for i in eval_idx]))
    train_x = images[train_idx]
    print(f"rd: {len(train_x)} training images, {len(eval_idx)} held-out evaluation images")

    jobs = [(f"q{q}", TrainConfig.from_quality(q, epochs=args.long_epochs if q in LONG_PRESETS else args.epochs,
                                               val_fraction=0.02))
            for q in args.qualities]
    jobs.append(("mlp", TrainConfig(arch="mlp", latent_dim=32, latent_bits=8, epochs=args.mlp_epochs,
                                    batch_size=256, learning_rate=1e-3, val_fraction=0.02)))
    model_dirs = []
    for i, (name, config) in enumerate(jobs):
        model_dir = os.path.join(args.out, "models", name)
        model_dirs.append(model_dir)
        if os.path.exists(os.path.join(model_dir, "codec.json")):
            print(f"rd: [{i + 1}/{len(jobs)}] {name} already trained, skipping", flush=True)
            continue
        print(f"rd: [{i + 1}/{len(jobs)}] training {name} ({config.arch}, lambda={config.lmbda}, "
              f"{config.epochs} epochs)", flush=True)
        started = time.time()
        tmp = model_dir + ".partial"
        spec = train(config, train_x, tmp)
        os.replace(tmp, model_dir)  # only a finished artifact counts as trained
        print(f"rd: {name} done in {time.time() - started:.0f} s, validation {spec['metrics']['val_psnr']:.2f} dB",
              flush=True)
    for (name, config), model_dir in zip(jobs, model_dirs):
        if config.lmbda is not None and not has_mixture(model_dir):
            spec = add_mixture_to(model_dir, train_x)
            print(f"rd: {name} was trained before mixture priors: fitted its {spec['training']['mixture']} table "
                  f"sets, validation {spec['metrics']['val_code_bytes']:.1f} code bytes", flush=True)
        if config.lmbda is not None and load_codec(model_dir).missing_refinement():
            add_refinement_to(model_dir)
            print(f"rd: {name} was exported before refinement: re-exported with its signatures", flush=True)

    evaluate_args = ["evaluate", "--input", val_path, "--input-format", "npz", "--output", args.out,
                     "--runner=FnApiRunner", "--refine", *map(str, args.refine)]
    for model_dir in model_dirs:
        evaluate_args += ["--model-dir", model_dir]
    if cli.main(evaluate_args):
        return 1
    record(args)
    return 0


def has_mixture(model_dir: str) -> bool:
    from pipeline.artifact import read_spec

    return (read_spec(model_dir).entropy_model or {}).get("kind") == "factorized-mixture"


def record(args) -> None:
    """Replace the rate-distortion section of BENCHMARKS.md with this run's table and plot."""
    import shutil

    from record import BENCHMARKS, replace_section

    table = open(os.path.join(args.out, "rd.md")).read().strip()
    command = " ".join(["python scripts/rd.py"] + sys.argv[1:])
    replace_section("rd", f"Measured with `{command}` ({time.strftime('%Y-%m-%d')}): presets trained on MNIST "
                          f"images from `../shared/data/mnist`, evaluated on held-out images never used in "
                          f"training.\n\n{table}\n\n![rate-distortion](rd.png)")
    shutil.copy(os.path.join(args.out, "rd.png"), os.path.join(os.path.dirname(BENCHMARKS), "rd.png"))


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
