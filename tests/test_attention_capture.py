"""MiniLM's capture of queries, keys and values inside attention: BERT (separate query/key/value), GPT-2
(fused c_attn) and Llama (q/k/v_proj with grouped key/value heads). For BERT and GPT-2 the attention
probabilities recomputed from the captured q and k equal the model's own (``output_attentions``), so
the capture holds what attention really used."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel

from fcd_ds.features import AttentionCapture, attention_projections, find_blocks


def _attention_from_qk(q: torch.Tensor, k: torch.Tensor, heads: int, mask: torch.Tensor, causal: bool) -> torch.Tensor:
    b, n, c = q.shape
    d = c // heads
    qh = q.view(b, n, heads, d).transpose(1, 2)  # (B, H, N, d)
    kh = k.view(b, n, heads, d).transpose(1, 2)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)  # (B, H, N, N)
    allowed = mask.bool()[:, None, None, :].expand(b, heads, n, n)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_captured_queries_and_keys_reproduce_the_models_attention(kind):
    torch.manual_seed(0)
    if kind == "bert":
        model = BertModel(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=60, attn_implementation="eager")).eval()
    else:
        model = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=60, attn_implementation="eager")).eval()
    ids = torch.randint(0, 60, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # padding at the end of the second sequence
    capture = AttentionCapture(model, [1])
    with torch.no_grad(), capture.recording():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    q, k, v = capture.features[1]
    assert q.shape == k.shape == v.shape == (2, 7, 32)
    expected = out.attentions[1]  # (B, H, N, N)
    got = _attention_from_qk(q, k, 4, mask, causal=kind == "gpt2")
    real = mask.bool()  # rows of padded queries are not compared (models differ in what they put there)
    torch.testing.assert_close(got[real[:, None, :, None].expand_as(got)].view(-1),
                               expected[real[:, None, :, None].expand_as(expected)].view(-1), atol=1e-5, rtol=1e-4)


def test_llama_grouped_key_value_heads_give_narrower_keys_and_values():
    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(num_hidden_layers=2, hidden_size=48, intermediate_size=64, num_attention_heads=6,
                                   num_key_value_heads=2, vocab_size=60)).eval()
    capture = AttentionCapture(model, [0, 1])
    with torch.no_grad(), capture.recording():
        model(input_ids=torch.randint(0, 60, (3, 5)))
    for block in (0, 1):
        q, k, v = capture.features[block]
        assert q.shape == (3, 5, 48) and k.shape == v.shape == (3, 5, 16)  # 6 x 8 query, 2 x 8 key/value channels
    # Outside recording() nothing is kept (activation-checkpoint recomputation must not overwrite).
    model(input_ids=torch.randint(0, 60, (3, 5)))
    assert capture.features[0][0].shape == (3, 5, 48)
    with capture.recording():
        pass
    assert capture.features == {}


def test_unknown_attention_layout_is_a_clear_error():
    block = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="drop minilm from --loss"):
        attention_projections(block)
    assert len(attention_projections(find_blocks(GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)))[0])[0]) == 1
