"""Chat and instruction data: real BBC conversations rendered with SmolLM2-135M-Instruct's own chat
template, assistant-only masks, the task loss and logit KD reading only those tokens (plain and fused
paths), per-document attention equal to running each document alone, and micro-batches that resume
exactly with DataLoader workers."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from fcd_ds.assets import bbc_conversation
from fcd_ds.config import DataArguments
from fcd_ds.data import MicroBatches, TextCorpus
from fcd_ds.tasks import CausalLMTask


@pytest.fixture(scope="module")
def smollm_tokenizer():
    from transformers import AutoTokenizer

    from fcd_ds.assets import prepare_default_assets

    return AutoTokenizer.from_pretrained(prepare_default_assets().teacher)


@pytest.fixture(scope="module")
def conversations(tmp_path_factory) -> dict:
    """12 real BBC articles as conversations (the title as the request, the body as the answer)."""
    from fcd_ds.assets import prepare_default_assets

    articles = [json.loads(line)["text"] for line in prepare_default_assets().validation_documents.read_text(encoding="utf-8").splitlines()[:12]]
    d = tmp_path_factory.mktemp("chat")
    rows = [bbc_conversation(a) for a in articles]
    (d / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    pairs = [{"prompt": r["messages"][0]["content"] + "\n", "completion": r["messages"][1]["content"]} for r in rows]
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs), encoding="utf-8")
    return {"dir": d, "rows": rows, "pairs": pairs}


def _blocks(tokenizer, path, **flags):
    args = DataArguments(train_file=str(path), validation_file=str(path), assistant_only_loss=True, **flags)
    return TextCorpus(tokenizer, args, "causal_lm").load()[0].to_dict()


def test_assistant_tokens_are_exactly_the_answers_with_their_end_of_turn(smollm_tokenizer, conversations):
    tok = smollm_tokenizer
    blocks = _blocks(tok, conversations["dir"] / "chat.jsonl", packing=False, max_seq_length=2048)
    for ids, mask, row in zip(blocks["input_ids"], blocks["loss_mask"], conversations["rows"]):
        rendered = tok.apply_chat_template(row["messages"], tokenize=False)
        assert tok.decode(ids) == rendered  # the template's own markers, nothing added
        answer = row["messages"][1]["content"]
        assert tok.decode([t for t, m in zip(ids, mask) if m]) == answer + "<|im_end|>\n"
        assert mask[0] == 0 and sum(mask) < len(mask)
    # packed: the same tokens and masks, concatenated and cut
    packed = _blocks(tok, conversations["dir"] / "chat.jsonl", max_seq_length=128)
    flat = [t for b in packed["input_ids"] for t in b]
    flat_mask = [m for b in packed["loss_mask"] for m in b]
    n = len(flat)
    assert flat == [t for b in blocks["input_ids"] for t in b][:n] and flat_mask == [m for b in blocks["loss_mask"] for m in b][:n]


def test_prompt_completion_pairs_mark_the_completion_and_its_eos(smollm_tokenizer, conversations):
    tok = smollm_tokenizer
    blocks = _blocks(tok, conversations["dir"] / "pairs.jsonl", packing=False, max_seq_length=2048)
    for ids, mask, pair in zip(blocks["input_ids"], blocks["loss_mask"], conversations["pairs"]):
        prompt = tok(pair["prompt"], add_special_tokens=False)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and ids[1 : 1 + len(prompt)] == prompt
        assert mask == [0] * (1 + len(prompt)) + [1] * (len(ids) - 1 - len(prompt))


def _logits_hitting(batch, positions_mask, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random logit tensors (B, N, V) that differ only at the positions where ``positions_mask`` is 0."""
    torch.manual_seed(0)
    b, n = batch["input_ids"].shape
    s = torch.randn(b, n, vocab)
    other = s.clone()
    other[positions_mask == 0] = torch.randn(int((positions_mask == 0).sum()), vocab) * 10
    return s, other


def test_task_loss_and_kd_read_only_assistant_positions_on_plain_and_fused_paths(smollm_tokenizer, conversations):
    from types import SimpleNamespace

    from fcd_ds.losses import causal_lm_loss, fused_linear_ce_kd, logit_kd_loss

    blocks = _blocks(smollm_tokenizer, conversations["dir"] / "chat.jsonl", max_seq_length=64)
    task = CausalLMTask(pad_id=2, max_seq_length=64)
    batch = task.collate({k: v[:6] for k, v in blocks.items()}, train=True)
    kd_positions = task.kd_mask(batch)
    assert torch.equal(kd_positions[:, :-1], batch["loss_mask"][:, 1:]) and kd_positions[:, -1].sum() == 0
    assert 0 < task.loss_tokens(batch) < batch["attention_mask"][:, 1:].sum()
    vocab = 17
    batch["input_ids"] = batch["input_ids"] % vocab
    s, changed = _logits_hitting(batch, kd_positions, vocab)
    t = torch.randn_like(s)
    out = lambda z: SimpleNamespace(logits=z)  # noqa: E731
    ce = task.task_loss(out(s), batch)
    assert ce == task.task_loss(out(changed), batch)  # logits at non-assistant positions do not matter
    assert task.kd_loss(out(s), out(t), batch, 2.0) == task.kd_loss(out(changed), out(t), batch, 2.0)
    assert ce != causal_lm_loss(s, batch["input_ids"], batch["attention_mask"])  # the mask changed what is read
    # fused: the same values from hidden states and head weights, with the task's masks
    torch.manual_seed(1)
    h_s, w_s, h_t, w_t = torch.randn(6, 64, 8), torch.randn(vocab, 8), torch.randn(6, 64, 12), torch.randn(vocab, 12)
    fused = fused_linear_ce_kd(h_s, w_s, h_t, w_t, batch["input_ids"], task.ce_mask(batch), temperature=2.0, kd_mask=kd_positions)
    plain_ce = causal_lm_loss(h_s @ w_s.T, batch["input_ids"], task.ce_mask(batch))
    plain_kd = logit_kd_loss(h_s @ w_s.T, h_t @ w_t.T, kd_positions, temperature=2.0)
    assert fused.ce.item() == pytest.approx(plain_ce.item(), rel=1e-5) and fused.kd.item() == pytest.approx(plain_kd.item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_per_document_attention_equals_each_document_alone(kind):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    from fcd_ds.data import position_ids_from_starts

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, 2)).eval()
    lengths = [7, 12, 5]
    docs = [torch.randint(1, 500, (n,)) for n in lengths]
    block = torch.cat(docs)[None]  # (1, 24)
    starts = [[7, 19]]
    task = CausalLMTask(max_seq_length=24, per_document_attention=True)
    batch = task.collate({"input_ids": block.tolist(), "document_starts": starts}, train=True)
    assert batch["position_ids"].tolist() == [list(range(7)) + list(range(12)) + list(range(5))]
    assert torch.equal(batch["position_ids"], position_ids_from_starts(starts, 24))
    assert batch["loss_mask"][0, [7, 19]].tolist() == [0, 0] and batch["loss_mask"].sum() == 22
    with torch.no_grad():
        packed = model(**task.model_inputs(batch)).logits[0]  # (24, V)
        alone = torch.cat([model(d[None]).logits[0] for d in docs])
        across = model(input_ids=block).logits[0]  # the default: attention across documents
    assert torch.allclose(packed, alone, atol=1e-5)
    assert not torch.allclose(across[7:], alone[7:], atol=1e-3)


def test_micro_batches_with_workers_equal_the_main_process_and_resume_exactly(corpus, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    args = DataArguments(train_file=str(corpus["train"]), validation_file=str(corpus["valid"]), max_seq_length=32)
    train, _ = TextCorpus(tok, args, "causal_lm").load()
    collate = partial(CausalLMTask(max_seq_length=32).collate, train=True)
    per_epoch = (len(train) // 2) // 4

    def take(stream, n):
        return [next(stream)["input_ids"] for _ in range(n)]

    main = take(MicroBatches(train, 4, 1, 2, 7, collate), per_epoch + 5)  # into the second epoch
    workers = take(MicroBatches(train, 4, 1, 2, 7, collate, num_workers=2, prefetch_factor=3), per_epoch + 5)
    assert all(torch.equal(a, b) for a, b in zip(main, workers, strict=True))
    stream = MicroBatches(train, 4, 1, 2, 7, collate, num_workers=2)
    take(stream, per_epoch - 2)  # the workers have prefetched beyond this point
    state = stream.state_dict()
    stream.close()
    resumed = MicroBatches(train, 4, 1, 2, 7, collate, num_workers=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(take(resumed, 7), main[per_epoch - 2 : per_epoch + 5], strict=True))
    # the order is DistributedSampler's
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(train, num_replicas=2, rank=1, shuffle=True, seed=7, drop_last=True)
    sampler.set_epoch(1)
    first = list(sampler)[:4]
    assert torch.equal(main[per_epoch], torch.tensor(train[first]["input_ids"]))


def test_streamed_micro_batches_resume_exactly_with_workers(corpus, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from fcd_ds.data import make_micro_batches

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    shards = []
    lines = [line for line in corpus["train"].read_text(encoding="utf-8").splitlines() if line.strip()][:40]
    for k in range(4):  # 4 files: whole files per rank, then per worker
        path = tmp_path / f"shard{k}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[k::4]), encoding="utf-8")
        shards.append(str(path))
    args = DataArguments(train_file=",".join(shards), validation_file=str(corpus["valid"]), max_seq_length=32, streaming=True)
    collate = partial(CausalLMTask(max_seq_length=32).collate, train=True)

    def stream(workers: int):
        epochs, _ = TextCorpus(tok, args, "causal_lm").load(rank=1, world=2, seed=3)
        return make_micro_batches(epochs, 4, 1, 2, 3, collate, num_workers=workers)

    full = stream(2)
    reference = [next(full)["input_ids"] for _ in range(40)]  # several epochs of this rank's 2 files
    assert full.epoch >= 1
    full.close()
    part = stream(2)
    first = [next(part)["input_ids"] for _ in range(13)]
    state = json.loads(json.dumps(part.state_dict()))  # what a checkpoint stores (JSON, per rank)
    part.close()
    again = stream(2)
    again.load_state_dict(state)
    rest = [next(again)["input_ids"] for _ in range(27)]
    assert all(torch.equal(a, b) for a, b in zip(first + rest, reference, strict=True))
    assert again.position == 40
