"""Block discovery, feature capture, depth pruning and tokenizer checks on tiny GPT-2 and Llama models."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import tiny_config
from fcd_ds.errors import UsageError
from fcd_ds.features import FeatureCapture, block_path
from fcd_ds.models import check_same_tokenizer, kept_teacher_blocks, load_config, prune_teacher, pruned_student_config

KINDS = ["gpt2", "llama"]


@pytest.mark.parametrize("kind", KINDS)
def test_capture_equals_hidden_states_of_selected_blocks(kind):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, 4)).eval()
    assert block_path(model) == {"gpt2": "transformer.h", "llama": "model.layers"}[kind]
    capture = FeatureCapture(model, [0, 2])
    ids = torch.randint(0, 512, (2, 9))
    with capture.recording():
        out = model(ids, output_hidden_states=True)
    assert sorted(capture.features) == [0, 2]  # only the selected blocks are kept
    for i in (0, 2):  # hidden_states[i + 1] is block i's output (the last one is after the final norm)
        assert torch.equal(capture.features[i], out.hidden_states[i + 1])
    model(ids)
    assert sorted(capture.features) == [0, 2]  # outside recording(): nothing replaced
    capture.remove()


def test_capture_ignores_activation_checkpoint_recompute():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 2)).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    capture = FeatureCapture(model, [1])
    with capture.recording():
        logits = model(torch.randint(0, 512, (2, 7))).logits
    kept = capture.features[1]
    assert kept.requires_grad  # the captured feature trains the student through the checkpointed block
    (logits.sum() + kept.sum()).backward()  # recompute re-runs block 1
    assert capture.features[1] is kept
    assert model.model.layers[1].mlp.down_proj.weight.grad.abs().sum() > 0


def test_kept_blocks_are_evenly_spaced_with_first_and_last():
    assert kept_teacher_blocks(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert kept_teacher_blocks(4, 2) == [0, 3]
    assert kept_teacher_blocks(4, 4) == [0, 1, 2, 3]
    assert kept_teacher_blocks(5, 1) == [4]
    with pytest.raises(UsageError, match="--student_num_layers"):
        kept_teacher_blocks(4, 5)


@pytest.mark.parametrize("kind", KINDS)
def test_pruned_student_copies_teacher_blocks_embeddings_norm_and_head(kind, tiny_models):
    path = tiny_models[f"{kind}_teacher"]
    teacher = AutoModelForCausalLM.from_pretrained(path).eval()
    cfg = load_config(str(path), "--teacher")
    whole = prune_teacher(str(path), cfg, 4, torch.float32).eval()
    ids = torch.randint(0, 512, (2, 11))
    assert torch.equal(whole(ids).logits, teacher(ids).logits)  # K = L reproduces the teacher exactly
    student = prune_teacher(str(path), cfg, 2, torch.float32)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    prefix = block_path(student)
    for key, value in s_sd.items():
        if key.startswith(prefix + "."):
            index, rest = key[len(prefix) + 1:].split(".", 1)
            source = f"{prefix}.{[0, 3][int(index)]}.{rest}"
        else:
            source = key
        assert torch.equal(value, t_sd[source]), key


def test_pruned_config_slices_per_layer_lists():
    cfg = tiny_config("llama", 4)
    cfg.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    small = pruned_student_config(cfg, 2)
    assert small.num_hidden_layers == 2 and small.layer_types == ["full_attention", "sliding_attention"]
    assert cfg.num_hidden_layers == 4  # teacher config untouched


def test_different_tokenizers_are_refused(tiny_models, tokenizer_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    same = AutoTokenizer.from_pretrained(tokenizer_dir)
    check_same_tokenizer(same, AutoTokenizer.from_pretrained(tiny_models["gpt2_student"]))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["a different corpus altogether"] * 10, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    other = PreTrainedTokenizerFast(tokenizer_object=tok)
    with pytest.raises(UsageError, match="--student: its tokenizer differs"):
        check_same_tokenizer(same, other)


def test_pruning_a_bare_encoder_into_a_classifier_copies_the_encoder_and_starts_a_fresh_head(tmp_path):
    """A plain BertModel checkpoint (keys without the ``bert.`` prefix, no classifier) pruned into a
    2-block AutoModelForSequenceClassification: every encoder tensor comes from the teacher's blocks 0 and
    3; only the classifier is new (as from_pretrained does)."""
    from transformers import AutoModel, AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
    AutoModel.from_config(cfg).save_pretrained(tmp_path / "bare")
    teacher = AutoModel.from_pretrained(tmp_path / "bare")
    student = prune_teacher(str(tmp_path / "bare"), load_config(str(tmp_path / "bare"), "--teacher"), 2, torch.float32,
                            AutoModelForSequenceClassification, {"num_labels": 3})
    assert student.config.num_labels == 3 and student.classifier.out_features == 3
    t_sd = teacher.state_dict()
    for key, value in student.bert.state_dict().items():
        source = key
        if key.startswith("encoder.layer."):
            index, rest = key[len("encoder.layer."):].split(".", 1)
            source = f"encoder.layer.{[0, 3][int(index)]}.{rest}"
        assert torch.equal(value, t_sd[source]), key
