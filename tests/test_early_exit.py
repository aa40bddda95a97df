"""fcd_ds.early_exit: the teacher cut after the deepest needed block gives the same block features as the
full forward, runs none of the later blocks, the final norm or the head, and leaves the model whole
afterwards; in a real 2-rank ZeRO-3 run the cut teacher gives the FCD values of the uncut one."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertForMaskedLM

from conftest import assert_ok, read_train_log, run_launcher, tiny_config
from fcd_ds.early_exit import EarlyExit
from fcd_ds.features import FeatureCapture, find_blocks


def _models():
    torch.manual_seed(0)
    yield "gpt2", AutoModelForCausalLM.from_config(tiny_config("gpt2", 4)).eval()
    yield "llama", AutoModelForCausalLM.from_config(tiny_config("llama", 4)).eval()
    bert = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    yield "bert", BertForMaskedLM(bert).eval()


@pytest.mark.parametrize("name, model", list(_models()), ids=lambda x: x if isinstance(x, str) else "")
def test_cut_forward_gives_the_same_features_and_skips_the_rest(name, model):
    ids = torch.randint(0, 512, (2, 12))
    mask = torch.ones_like(ids)
    capture = FeatureCapture(model, [0, 1])
    with torch.no_grad(), capture.recording():
        full = model(input_ids=ids, attention_mask=mask)
    reference = {k: v.clone() for k, v in capture.features.items()}
    calls = []
    blocks = find_blocks(model)
    hooks = [blocks[i].register_forward_hook(lambda *_, i=i: calls.append(i)) for i in range(4)]
    cut = EarlyExit(model, depth=2)
    assert cut.head_path is not None
    with torch.no_grad(), capture.recording(), cut.active():
        out = model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    assert calls == [0, 1]  # blocks 2 and 3 never ran
    assert out.logits.shape[-1] == 0  # no head
    for k in reference:
        assert torch.equal(capture.features[k], reference[k]), k
    if name != "bert":
        assert cut.norm_path is not None  # Llama's model.norm, GPT-2's transformer.ln_f
    # the model is whole again
    assert len(find_blocks(model)) == 4
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, full.logits)
    with pytest.raises(ValueError, match="depth must be in 1..4"):
        EarlyExit(model, depth=5)


def test_zero3_teacher_cut_after_block_1_gives_the_uncut_fcd(tiny_models, corpus, tmp_path):
    """--layer_map 0:1: the teacher runs blocks 0-1 only (KD off); with KD on it runs whole. The first
    step's FCD and CE terms (same student, same batch) are equal."""
    from fcd_ds.config import DS_CONFIG_DIR

    cfg = json.loads((DS_CONFIG_DIR / "zero3.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_json = tmp_path / "zero3_tiny.json"
    ds_json.write_text(json.dumps(cfg))
    runs = {}
    for name, extra in (("cut", ["--loss", "ce+fcd"]), ("whole", ["--loss", "ce+fcd+kd", "--kd_weight", "1e-3"])):
        runs[name] = tmp_path / name
        assert_ok(run_launcher(["--teacher", tiny_models["llama_teacher"], "--student", tiny_models["llama_student"],
                                "--layer_map", "0:1", "--max_steps", 1, "--deepspeed_config", ds_json,
                                "--train_file", corpus["train"], "--validation_file", corpus["valid"], "--max_seq_length", 32,
                                "--per_device_train_batch_size", 2, "--max_eval_samples", 8, "--output_dir", runs[name], *extra]))
    first = {name: read_train_log(out)[0] for name, out in runs.items()}
    for key in ("train/loss/fcd", "train/fcd/s0_t1/token", "train/fcd/s0_t1/sequence", "train/loss/ce"):
        assert first["cut"][key] == pytest.approx(first["whole"][key], abs=1e-6), key
