"""Shared fixtures: small train/validation text files cut from the BBC News corpus that the asset step
installs (``make test`` prepares it; nothing outside the repository is read), a tiny BPE tokenizer
trained on it, tiny GPT-2 and Llama teachers/students saved as Hugging Face folders, and a helper that
runs a launcher under ``deepspeed --num_gpus 2`` (real 2-rank gloo runs on CPU)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launchers" / "distill_gpt.py"


def pytest_configure(config):
    """A suite started as a shell's background job (``make test &``, ``nohup``) inherits SIGINT ignored,
    and Python, fcd_ds's StopFlag and every process the tests launch keep it so (POSIX: an ignored signal
    stays ignored across exec). The tests that send SIGINT to themselves or to a ``deepspeed`` runner need
    the interactive default, which is put back here; children then start with SIGINT at its default."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _bbc() -> tuple[str, str]:
    """The prepared BBC News corpus (train text, held-out text): real English the asset step installs."""
    from fcd_ds.assets import prepare_default_assets

    assets = prepare_default_assets()
    return assets.train_file.read_text(encoding="utf-8"), assets.validation_file.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Small real-English train/validation files cut from the BBC News corpus (deterministic)."""
    train_text, valid_text = _bbc()
    d = tmp_path_factory.mktemp("corpus")
    train, valid = d / "train.txt", d / "valid.txt"
    train.write_text(train_text[200_000:260_000], encoding="utf-8")
    valid.write_text(valid_text[:12_000], encoding="utf-8")
    return {"train": train, "valid": valid, "dir": d}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 512-token byte-level BPE tokenizer trained on 300 kB of BBC News (keeps tiny models' logits small)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator([_bbc()[0][:300_000]], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    d = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(d)
    return d


def tiny_config(kind: str, layers: int, width: int = 64):
    """Tiny GPT-2 or Llama config (2-4 blocks, width 64) with the tiny tokenizer's 512 tokens."""
    from transformers import GPT2Config, LlamaConfig

    if kind == "gpt2":
        return GPT2Config(n_layer=layers, n_embd=width, n_head=4, n_positions=128, vocab_size=512,
                          bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return LlamaConfig(num_hidden_layers=layers, hidden_size=width, intermediate_size=2 * width, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=128, vocab_size=512, bos_token_id=0,
                       eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """Seeded random tiny teachers (4 blocks) and narrower students (2 blocks, width 32), saved with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    root = tmp_path_factory.mktemp("models")
    out = {}
    for kind in ("gpt2", "llama"):
        for role, layers, width in (("teacher", 4, 64), ("student", 2, 32)):
            torch.manual_seed(0 if role == "teacher" else 1)
            model = AutoModelForCausalLM.from_config(tiny_config(kind, layers, width))
            path = root / f"{kind}_{role}"
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            out[f"{kind}_{role}"] = path
    return out


@pytest.fixture(scope="session")
def finished_run(tiny_models, corpus, tmp_path_factory) -> Path:
    """A complete 1-rank, 2-step run of the tiny GPT-2 pair (checkpoint global_step2, export, manifest):
    tests copy it before changing anything in it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert_ok(run_launcher(["--teacher", tiny_models["gpt2_teacher"], "--student_num_layers", 2, "--train_file", corpus["train"],
                            "--validation_file", corpus["valid"], "--max_seq_length", 32, "--per_device_train_batch_size", 2,
                            "--max_steps", 2, "--max_eval_samples", 4, "--output_dir", out], ranks=1))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launcher(args: list[str], *, ranks: int = 2, timeout: int = 600, env: dict | None = None,
                 launcher: Path = LAUNCHER) -> subprocess.CompletedProcess:
    """Run a launcher (default launchers/distill_gpt.py) under ``deepspeed --num_gpus RANKS`` on a free port."""
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), str(launcher), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def run_plain(args: list[str], timeout: int = 300, launcher: Path = LAUNCHER) -> subprocess.CompletedProcess:
    """Run a launcher as a plain single process (bad-input checks happen before DeepSpeed starts)."""
    return subprocess.run([sys.executable, str(launcher), *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def read_train_log(output_dir: Path) -> list[dict]:
    """The run's train_log.jsonl rows that hold a training loss."""
    rows = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss/total" in r]


def leftover_shm(result: subprocess.CompletedProcess) -> list[Path]:
    """DeepSpeed CPU all-reduce buffers that a :func:`run_launcher` run left in /dev/shm (should be none)."""
    port = result.args[result.args.index("--master_port") + 1]
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"
    assert not leftover_shm(result), leftover_shm(result)


def snapshot(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under ``directory`` (to prove a failed run wrote nothing)."""
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


def peak_allocated_bytes(fn) -> int:
    """Peak of CPU bytes allocated (net of frees) while ``fn()`` runs, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak
