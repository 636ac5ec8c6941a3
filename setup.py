"""diffusion_jax: Imagen-style text-to-image diffusion in JAX/Flax.

Pins are exact: this set was installed together and tested on Python 3.11 (CPU).
TensorFlow is deliberately not a dependency: TFDS datasets are written as
array_record and read with `tfds.data_source` + grain.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml_collections==1.1.0",
    "tensorflow-datasets==4.9.10",
    # Imported by tensorflow_datasets (core/dataset_builder.py) without declaring it.
    "importlib_resources==7.1.0",
    "pillow==13.0.0",
    "grain==0.2.18",
    "transformers==5.23.0",
    "safetensors==0.8.0",              # models/hf_checkpoint.py reads checkpoints with it
    "tensorboardX==2.6.5",
    # Not imported: caption grids draw with the DejaVu Sans font it ships (images.py).
    "matplotlib==3.11.2",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "fonttools==4.68.0",  # reads the colour emoji font's CBDT table (diffusion_jax.data.emoji)
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest==9.2.0",
        # make test runs the suite on two workers (one per core here), a file per worker.
        "pytest-xdist==3.8.0",
        "hypothesis==6.170.15",
        "ruff==0.17.6",
        # Only as a numerical reference in tests (T5 parity). 2.13.0 is the CPU wheel
        # available locally; a looser pin would pull a multi-GB CUDA build.
        "torch==2.13.0",
        # Test-only reference for the Flax AutoencoderKL (VAE parity with diffusers' PyTorch
        # model, tests/test_autoencoder.py); never imported by the library.
        "diffusers==0.42.1",
        # Only as a reference in tests (scipy.linalg.sqrtm for the Frechet distance).
        "scipy==1.17.1",
    ],
}

setup(
    name="diffusion_jax",
    version="0.1.0",
    description="Imagen-style text-to-image diffusion in JAX/Flax",
    packages=find_packages(include=["diffusion_jax", "diffusion_jax.*"]),
    python_requires=">=3.11,<3.12",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
