"""Held-out batches: every rank runs the same number of forwards, every real row is counted once;
special-token framing of text blocks for encoders."""

from functools import partial

import pytest
from datasets import Dataset

from fcd_ds.data import eval_batches, special_token_frame as _special_token_frame
from fcd_ds.errors import UsageError
from fcd_ds.tasks import CausalLMTask


def rows(n: int) -> Dataset:
    return Dataset.from_dict({"input_ids": [[i, i, i] for i in range(n)]}).with_format("torch")


@pytest.mark.parametrize("n,batch,world", [(5, 2, 2), (8, 2, 2), (1, 4, 2), (7, 3, 1)])
def test_eval_batches_pad_to_equal_rounds_and_mark_padding(n, batch, world):
    collate = partial(CausalLMTask(max_seq_length=3).collate, train=False)
    per_rank = [eval_batches(rows(n), batch, r, world, collate=collate) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # same number of forwards on every rank (ZeRO-3)
    seen = [int(ids[0]) for batches in per_rank for b in batches for ids, real in zip(b["input_ids"], b["example_mask"]) if real]
    assert sorted(seen) == list(range(n))  # each real row exactly once
    assert all(b["input_ids"].shape == (batch, 3) for batches in per_rank for b in batches)


def test_eval_batches_limit_and_empty():
    collate = partial(CausalLMTask(max_seq_length=3).collate, train=False)
    (b,) = eval_batches(rows(10), 4, 0, 1, max_samples=3, collate=collate)
    assert b["example_mask"].tolist() == [1, 1, 1, 0]
    with pytest.raises(UsageError, match="--validation_file"):
        eval_batches(rows(0), 4, 0, 1, collate=collate)


def test_special_token_frame_of_bert_and_gpt_tokenizers(tokenizer_dir):
    from transformers import AutoTokenizer

    from fcd_ds.assets import prepare_encoder_assets

    bert = AutoTokenizer.from_pretrained(prepare_encoder_assets().minilm)
    assert _special_token_frame(bert) == ([bert.cls_token_id], [bert.sep_token_id])
    assert _special_token_frame(AutoTokenizer.from_pretrained(tokenizer_dir)) == ([], [])  # byte-level BPE adds none
