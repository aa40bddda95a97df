"""Typed run configuration: one dataclass per concern, parsed from the command line by transformers'
``HfArgumentParser`` (flag names follow ``run_clm.py`` where one exists). Range checks run in
``__post_init__`` and raise :class:`~fcd_ds.errors.UsageError` naming the flag."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import UsageError
from .runtime.host_memory import check_host_memory_reuse
from .losses import FCD_STACK_PAIRS, SEQUENCE_RELATIONS
from .tasks import TASK_NAMES

__all__ = [
    "ModelArguments",
    "FinetuneModelArguments",
    "ATTN_IMPLEMENTATIONS",
    "DataArguments",
    "SAMPLE_BY",
    "DistillArguments",
    "LOSS_TERMS",
    "FCD_STACK_PAIRS",
    "TrainArguments",
    "REPORT_TO",
    "parse_args",
    "read_recipe",
    "START_FLAGS",
    "unknown_flags_message",
    "DS_CONFIG_DIR",
    "DEFAULT_DS_CONFIG",
]

# ds_configs/ ships as package data (fcd_ds/ds_configs in an installed wheel); a source checkout or an
# editable install reads the repository's top-level folder.
_PACKAGED = Path(__file__).resolve().parent / "ds_configs"
DS_CONFIG_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parent.parent / "ds_configs"
DEFAULT_DS_CONFIG = DS_CONFIG_DIR / "zero2.json"


def _finite(args) -> None:
    """Refuse NaN and infinity in every float flag of a dataclass (they compare False with every bound)."""
    for f in fields(args):
        value = getattr(args, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{f.name}: must be a finite number, got {value}")


def _positive(flag: str, value, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise UsageError(f"--{flag}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")  # --attn_implementation: transformers' names


def _check_attn_implementation(value: str | None) -> None:
    if value is not None and value not in ATTN_IMPLEMENTATIONS:
        raise UsageError(f"--attn_implementation: must be one of {', '.join(ATTN_IMPLEMENTATIONS)} (or omitted: transformers' choice), got {value!r}")


@dataclass
class ModelArguments:
    """Teacher and student."""

    teacher: str | None = field(
        default=None,
        metadata={"help": "Teacher: folder or hub name, loaded with the task's Auto class. Default: the launcher's embedded teacher."},
    )
    student: str | None = field(default=None, metadata={"help": "Pretrained student folder or hub name (same tokenizer as the teacher)."})
    student_config: str | None = field(default=None, metadata={"help": "Config (folder or config.json) of a freshly initialised student."})
    student_num_layers: int | None = field(
        default=None,
        metadata={"help": "Depth-prune the teacher to K evenly spaced blocks. Default when no student is given: a third of the teacher's blocks."},
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Activation checkpointing of the student's blocks."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the Python code a model folder ships (its config's auto_map). Off: such a folder is refused in one line, never with a prompt."})
    use_safetensors: bool = field(default=True, metadata={"help": "Read weights from safetensors files only; false: pickled .bin files too (transformers loads them with weights_only=True)."})
    attn_implementation: str | None = field(default=None, metadata={"help": "Attention kernel of teacher and student: eager, sdpa or flash_attention_2 (transformers' attn_implementation; flash_attention_2 needs CUDA, the flash_attn package and --bf16 or --fp16). Default: transformers' choice (sdpa where the model has it)."})
    revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of the hub names given (teacher and student: config, tokenizer, weights); run_clm's model_revision. A local folder ignores it. Default: main."})

    def __post_init__(self):
        _finite(self)
        _check_attn_implementation(self.attn_implementation)
        given = [f for f in ("student", "student_config", "student_num_layers") if getattr(self, f) is not None]
        if len(given) > 1:
            raise UsageError(f"--{given[0]} and --{given[1]} both choose the student; pass only one")
        _positive("student_num_layers", self.student_num_layers)


@dataclass
class FinetuneModelArguments:
    """The model that ``launchers/finetune_teacher.py`` fine-tunes on the task (no teacher, no distillation)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained model to fine-tune (folder or hub name), e.g. a teacher or a task-agnostic student. "
                          "Default: all-MiniLM-L6-v2 prepared by `python -m fcd_ds.assets`."},
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Activation checkpointing of the model's blocks."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the Python code a model folder ships (its config's auto_map); off: refused in one line."})
    use_safetensors: bool = field(default=True, metadata={"help": "Read weights from safetensors files only; false: pickled .bin files too."})
    attn_implementation: str | None = field(default=None, metadata={"help": "Attention kernel: eager, sdpa or flash_attention_2 (transformers' attn_implementation; flash_attention_2 needs CUDA, flash_attn and --bf16 or --fp16). Default: transformers' choice."})
    revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of a hub name (config, tokenizer, weights); a local folder ignores it. Default: main."})

    def __post_init__(self):
        _check_attn_implementation(self.attn_implementation)

    def as_model_arguments(self) -> ModelArguments:
        """The engine's view: the model to fine-tune is the (only) trained model, the student."""
        return ModelArguments(teacher=None, student=self.model_name_or_path, gradient_checkpointing=self.gradient_checkpointing,
                              trust_remote_code=self.trust_remote_code, use_safetensors=self.use_safetensors,
                              attn_implementation=self.attn_implementation, revision=self.revision)


SAMPLE_BY = ("line", "paragraph", "document")  # datasets' text builder: what one row (document) of a .txt file is


@dataclass
class DataArguments:
    """Task and data (README "Data"). Every task reads .txt, .json/.jsonl, .csv/.tsv, .parquet (several
    files or a glob), a ``save_to_disk`` folder, or ``--dataset_name``; text tasks turn rows into documents
    (text, chat ``messages`` or ``prompt``/``completion``) packed into blocks of max_seq_length tokens
    (:mod:`fcd_ds.data`); sequence_classification reads text, pair and label columns, as run_glue.py."""

    task: str = field(default="causal_lm", metadata={"help": f"One of {TASK_NAMES}; the launcher sets its default."})
    train_file: str | None = field(default=None, metadata={"help": "Training data: a .txt, .json/.jsonl, .csv/.tsv or .parquet file (optionally .gz/.bz2/.xz/.zst), files joined by commas, a glob ('shards/*.parquet'), or a datasets save_to_disk folder. Default: the launcher's embedded data."})
    validation_file: str | None = field(default=None, metadata={"help": "Held-out data, same forms. Default: a validation_split_percentage slice of the training data."})
    validation_split_percentage: int = field(default=5, metadata={"help": "Percent of train blocks (or rows) held out when no validation data is given."})
    dataset_name: str | None = field(default=None, metadata={"help": "A hub dataset or a local dataset folder, read by datasets.load_dataset (a save_to_disk folder by load_from_disk); needs a hub connection for hub names."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The --dataset_name configuration (default: --task_name for GLUE)."})
    train_split: str = field(default="train", metadata={"help": "Split of --dataset_name (or of a DatasetDict folder) to train on."})
    validation_split: str = field(default="validation", metadata={"help": "Held-out split of --dataset_name or a DatasetDict folder (absent: held out from train); GLUE's mnli defaults to validation_matched."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per sequence (<= the models' positions): text tasks' block length; classification truncates to it (and pads to it with --pad_to_max_length)."})
    max_eval_samples: int = field(default=64, metadata={"help": "Held-out blocks or rows used for the metrics (0 = all)."})
    text_column: str | None = field(default=None, metadata={"help": "Column of the text (classification: of the first sentence). Default: 'text', else the only string column; text tasks read a 'messages' or 'prompt'/'completion' column instead when there is one."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Classification: column of the second sentence of a pair (e.g. 'hypothesis')."})
    label_column: str = field(default="label", metadata={"help": "Classification: label column; strings/integers are classes, non-integer floats regression."})
    task_name: str | None = field(default=None, metadata={"help": "GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli): its columns and metrics."})
    sample_by: str = field(default="line", metadata={"help": f"A .txt file's documents: one per {' / '.join(SAMPLE_BY)} (datasets' text builder; 'paragraph' = blank-line separated)."})
    encoding: str = field(default="utf-8", metadata={"help": "Encoding of .txt, .json and .csv files (Python codec name); a byte it cannot decode is an error naming the file and offset."})
    packing: bool = field(default=True, metadata={"help": "Text tasks: pack documents into full blocks of max_seq_length (run_clm's group_texts); false: one document per sequence, truncated and padded."})
    per_document_attention: bool = field(default=False, metadata={"help": "Causal LM with packing: position ids restart at each document and attention stays within it (transformers' packed-sequence masks: eager, sdpa, flash_attention_2); the target of each document's first token is not counted."})
    chat_template_path: str | None = field(default=None, metadata={"help": "Jinja chat template (or a JSON file with 'chat_template') for 'messages' rows, instead of the teacher tokenizer's own (TRL SFT's flag)."})
    assistant_only_loss: bool = field(default=False, metadata={"help": "Causal LM on 'messages' or 'prompt'/'completion' rows: the task loss and logit KD read only the assistant's (completion's) tokens (TRL's name). FCD relations read every token."})
    dataset_prepared_path: str | None = field(default=None, metadata={"help": "Folder of tokenised, packed blocks (fcd-ds-prepare-data; axolotl's name), memory-mapped by every rank. Missing: prepared there first from the data flags (or the default corpus)."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes that tokenise raw data (datasets' map num_proc; run_clm's name). Default (or 1): the training process itself, whose fast tokenizer uses every core; N > 1: N worker processes of one thread each."})
    preprocess_on_each_node: bool = field(default=True, metadata={"help": "Raw data is tokenised by local rank 0 of every node (its own datasets cache); false: by global rank 0 alone, for a datasets cache (HF_DATASETS_CACHE) on a file system all nodes share."})
    streaming: bool = field(default=False, metadata={"help": "Text tasks: read the training files lazily (datasets IterableDataset: .txt, .jsonl, .csv, .parquet), tokenise and pack on the fly, each rank its own share; for corpora larger than memory. Needs held-out data."})
    pad_to_max_length: bool = field(default=False, metadata={"help": "Classification: pad every batch to max_seq_length (run_glue.py's flag); default: to the longest real sequence of the global batch, all ranks agreeing on that length (same values, less padding work)."})
    mlm_probability: float = field(default=0.15, metadata={"help": "masked_lm with an MLM head: fraction of tokens masked (BERT: 0.15)."})

    def __post_init__(self):
        import codecs

        _finite(self)
        from .data.glue import GLUE_TASK_KEYS

        if self.task not in TASK_NAMES:
            raise UsageError(f"--task: must be one of {TASK_NAMES}, got {self.task!r}")
        _positive("max_seq_length", self.max_seq_length)
        _positive("max_eval_samples", self.max_eval_samples, allow_zero=True)
        _positive("preprocessing_num_workers", self.preprocessing_num_workers)
        if not 0 < self.validation_split_percentage < 100:
            raise UsageError(f"--validation_split_percentage: must be in 1..99, got {self.validation_split_percentage}")
        if self.max_seq_length < 3:
            raise UsageError("--max_seq_length: must be >= 3 (the token relation needs 3 tokens)")
        if not 0 < self.mlm_probability < 1:
            raise UsageError(f"--mlm_probability: must be in (0, 1), got {self.mlm_probability}")
        if self.task_name is not None and self.task_name not in GLUE_TASK_KEYS:
            raise UsageError(f"--task_name: {self.task_name!r} is not a GLUE task; use one of {', '.join(GLUE_TASK_KEYS)} or omit it")
        if self.sample_by not in SAMPLE_BY:
            raise UsageError(f"--sample_by: must be one of {SAMPLE_BY}, got {self.sample_by!r}")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise UsageError(f"--encoding: {self.encoding!r} is not a Python codec; use e.g. utf-8, latin-1 or cp1252") from None
        if self.dataset_name is not None and self.train_file is not None:
            raise UsageError("--dataset_name and --train_file both choose the data; pass one")
        text = self.task != "sequence_classification"
        if self.streaming and not text:
            raise UsageError("--streaming: classification reads its labels whole (the label set comes from the data); drop --streaming")
        if self.streaming and self.dataset_prepared_path is not None:
            raise UsageError("--streaming and --dataset_prepared_path: a prepared folder is already memory-mapped; pass one of them")
        causal = self.task == "causal_lm"
        for flag in ("per_document_attention", "assistant_only_loss", "chat_template_path"):
            if getattr(self, flag) and not causal:
                raise UsageError(f"--{flag}: only for --task causal_lm (decoders); drop it")
        if self.per_document_attention and not self.packing:
            raise UsageError("--per_document_attention: with --packing false each sequence already holds one document; drop one of them")


LOSS_TERMS = ("ce", "fcd", "kd", "hidden_mse", "minilm", "dist")
"""Loss terms ``--loss`` can combine: the task loss and five distillation methods (see :class:`DistillArguments`)."""


WEIGHT_SCHEDULES = {
    "constant": lambda progress: 1.0,
    "linear": lambda progress: max(0.0, 1.0 - progress),
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))),
}
"""``--fcd_weight_schedule``: the factor on ``--fcd_weight`` at ``progress`` = steps done / ``--max_steps`` in [0, 1]."""
FEATURE_TERMS = ("fcd", "hidden_mse", "minilm")
"""Terms computed from intermediate features (block outputs, attention), which ``--loss_balancer`` rescales."""
LOGIT_TERMS = ("kd", "dist")
"""Terms computed from the teacher's logits, the reference of ``--loss_balancer``."""


# Used when --loss is not given: the task loss plus FCD, each other term off unless its weight is given.
_DEFAULT_WEIGHTS = {"ce": 1.0, "fcd": 1.0, "kd": 0.0, "hidden_mse": 0.0, "minilm": 0.0, "dist": 0.0}


@dataclass
class DistillArguments:
    """Loss terms. ``total = sum over terms of <term>_weight * term``; a weight of 0 switches its term off.

    ``--loss`` names the terms of a run, joined by ``+`` (``ce+fcd``, ``ce+kd+hidden_mse``, ``fcd``): each
    named term gets weight 1 unless ``--<term>_weight`` says otherwise, and every other term is off (giving
    a weight to a term not named is an error). Without ``--loss``, the weights alone decide, with
    ``ce`` and ``fcd`` at 1 and the rest at 0 by default. After ``__post_init__`` every ``<term>_weight``
    holds the resolved float.

    Terms: ``ce`` the task loss on the data; ``fcd`` Feature Correlation Distillation (Huang, Guo, Wang,
    NeurIPS 2023) on the ``--layer_map`` blocks; ``kd`` logit KD (Hinton et al., 2015); ``hidden_mse``
    MSE between ``--layer_map`` block outputs through a learned projection (TinyBERT, BERT-PKD);
    ``minilm`` MiniLMv2 query/key/value self-attention relations on the ``--minilm_layer_map`` blocks;
    ``dist`` DIST's inter- and intra-class Pearson relations on the logits (Huang et al., NeurIPS 2022).
    """

    loss: str | None = field(default=None, metadata={"help": f"Loss terms joined by '+', from {LOSS_TERMS}, e.g. 'ce+fcd' or 'kd+hidden_mse'. Default: weights decide (ce+fcd)."})
    layer_map: str = field(default="uniform", metadata={"help": "Blocks matched by fcd and hidden_mse: 'uniform', 'last', 'pruned' (each pruned student block with the teacher block it was copied from) or 'student:teacher[@weight],...' (0-based)."})
    ce_weight: float | None = field(default=None, metadata={"help": "Weight of the task loss on the data (next-token or masked-LM cross-entropy, classification CE, regression MSE)."})
    fcd_weight: float | None = field(default=None, metadata={"help": "Weight of the FCD term (weighted mean over layer pairs)."})
    kd_weight: float | None = field(default=None, metadata={"help": "Weight of logit KD (KL at temperature on the heads' logits; MSE for regression); needs the teacher's head."})
    hidden_mse_weight: float | None = field(default=None, metadata={"help": "Weight of hidden-state MSE (mean over layer pairs; learned projection when widths differ, not exported)."})
    minilm_weight: float | None = field(default=None, metadata={"help": "Weight of MiniLMv2 attention relations (QQ + KK + VV KL, mean over --minilm_layer_map pairs)."})
    dist_weight: float | None = field(default=None, metadata={"help": "Weight of DIST (inter- + intra-class Pearson relations of the heads' probabilities); needs the teacher's head."})
    fcd_alpha: float = field(default=1.0, metadata={"help": "Weight of FCD's token-level relation term."})
    fcd_beta: float = field(default=1.0, metadata={"help": "Weight of FCD's sequence-level relation term."})
    fcd_sequence_relation: str = field(default="position", metadata={"help": f"Sequence relation: one of {SEQUENCE_RELATIONS}."})
    fcd_global_batch: bool = field(default=True, metadata={"help": "All-gather features over data-parallel ranks for the sequence relation."})
    fcd_sequence_positions: int = field(default=0, metadata={"help": "Read the position sequence relation at this many evenly spaced positions instead of all N (an approximation that cuts its collective bytes and O(N B^2 C) work by that fraction: benchmarks/fcd_comm.py); 0 = every position, the spec's relation."})
    fcd_stack_pairs: str = field(default="auto", metadata={"help": "Compute the FCD layer pairs stacked, one set of kernels for several pairs (fcd_ds.losses.fcd_pair_terms; same values): 'true', 'false', or 'auto' = on GPUs and other accelerators (launch-bound at short sequences), and on CPUs when FCD's global batch spans several ranks (one set of collectives per group instead of per pair), else off on CPUs (slower there: benchmarks/RESULTS.md)."})
    fcd_chunk_size: int = field(default=1024, metadata={"help": "Rows of the N x N token relation, and positions of the B x N x B sequence relation, computed at once (memory bound)."})
    kd_temperature: float = field(default=2.0, metadata={"help": "Temperature of logit KD."})
    fused_logit_loss: bool = field(default=True, metadata={"help": "Causal LMs: compute the next-token CE and logit KD inside the LM head a chunk of 256 tokens at a time from the last hidden states, so no (B, N, V) logits are held (fcd_ds.losses.fused; same values). Off with dist (it needs the logits) and for encoders."})
    minilm_layer_map: str = field(default="last", metadata={"help": "Blocks matched by minilm (MiniLMv2: the student's last block with the teacher's last or an upper-middle one); same syntax as --layer_map."})
    minilm_relation_heads: int | None = field(default=None, metadata={"help": "MiniLMv2 relation heads (must divide the query, key and value widths of both models). Default: the teacher's key/value head count."})
    dist_temperature: float = field(default=1.0, metadata={"help": "Temperature of DIST (the paper's default: 1)."})
    dist_inter_weight: float = field(default=1.0, metadata={"help": "DIST's beta: weight of the inter-class relation."})
    dist_intra_weight: float = field(default=1.0, metadata={"help": "DIST's gamma: weight of the intra-class relation."})
    fcd_weight_schedule: str = field(default="constant", metadata={"help": f"FCD's weight over training: one of {tuple(WEIGHT_SCHEDULES)}: 'constant' (--fcd_weight throughout), 'linear' (from --fcd_weight at step 0 to 0 at --max_steps) or 'cosine' (half a cosine from --fcd_weight to 0): FCD early, the other terms throughout."})
    loss_balancer: float = field(default=0.0, metadata={"help": "Rescale the feature terms (fcd, hidden_mse, minilm) every micro-batch so that their weighted sum is this fraction of the weighted logit loss (kd, dist), the scale not differentiated (the idea of NVIDIA ModelOpt's LogitsAndIntermediatesLossBalancer, which uses 1); 0 = off, the weights alone."})

    def __post_init__(self):
        _finite(self)
        self._resolve_weights()
        for name in ("fcd_alpha", "fcd_beta", "dist_inter_weight", "dist_intra_weight"):
            _positive(name, getattr(self, name), allow_zero=True)
        for name in ("kd_temperature", "fcd_chunk_size", "minilm_relation_heads", "dist_temperature"):
            _positive(name, getattr(self, name))
        if self.fcd_sequence_relation not in SEQUENCE_RELATIONS:
            raise UsageError(f"--fcd_sequence_relation: must be one of {SEQUENCE_RELATIONS}, got {self.fcd_sequence_relation!r}")
        if self.fcd_sequence_positions < 0:
            raise UsageError(f"--fcd_sequence_positions: must be >= 0 (0 = every position), got {self.fcd_sequence_positions}")
        if self.fcd_sequence_positions and self.fcd_sequence_relation != "position":
            raise UsageError("--fcd_sequence_positions: applies to --fcd_sequence_relation position only; drop it, or use the position relation")
        if self.fcd_stack_pairs not in FCD_STACK_PAIRS:
            raise UsageError(f"--fcd_stack_pairs: must be one of {tuple(FCD_STACK_PAIRS)}, got {self.fcd_stack_pairs!r}")
        if self.fcd_weight and not (self.fcd_alpha or self.fcd_beta):
            raise UsageError("--fcd_alpha and --fcd_beta are both 0; set one > 0, or --fcd_weight 0 to switch FCD off")
        if self.dist_weight and not (self.dist_inter_weight or self.dist_intra_weight):
            raise UsageError("--dist_inter_weight and --dist_intra_weight are both 0; set one > 0, or drop dist from --loss")
        if self.fcd_weight_schedule not in WEIGHT_SCHEDULES:
            raise UsageError(f"--fcd_weight_schedule: must be one of {tuple(WEIGHT_SCHEDULES)}, got {self.fcd_weight_schedule!r}")
        _positive("loss_balancer", self.loss_balancer, allow_zero=True)
        if self.loss_balancer:
            w = self.weights
            if not any(w[t] for t in LOGIT_TERMS) or not any(w[t] for t in FEATURE_TERMS):
                raise UsageError(f"--loss_balancer: needs a logit term {LOGIT_TERMS} and a feature term {FEATURE_TERMS} in --loss "
                                 f"(got {self.loss or 'the default ce+fcd'}); add them, e.g. --loss ce+kd+fcd, or drop --loss_balancer")
        if not any(self.weights.values()):
            raise UsageError(f"every loss weight is 0 ({', '.join(f'--{t}_weight' for t in LOSS_TERMS)}); nothing to train")

    def _resolve_weights(self) -> None:
        given = {t: getattr(self, f"{t}_weight") for t in LOSS_TERMS}
        for term, w in given.items():
            _positive(f"{term}_weight", w, allow_zero=True)
        if self.loss is None:
            for term, w in given.items():
                setattr(self, f"{term}_weight", _DEFAULT_WEIGHTS[term] if w is None else float(w))
            return
        named = [t.strip() for t in self.loss.split("+")]
        unknown = [t for t in named if t not in LOSS_TERMS]
        if unknown or not all(named):
            raise UsageError(f"--loss: cannot read {self.loss!r}; join terms from {LOSS_TERMS} with '+', e.g. 'ce+fcd'")
        if len(set(named)) != len(named):
            raise UsageError(f"--loss: {self.loss!r} names a term twice; name each once")
        for term, w in given.items():
            if term not in named and w:
                raise UsageError(f"--{term}_weight: {term} is not in --loss {self.loss}; add it (--loss {self.loss}+{term}) or drop the weight")
            setattr(self, f"{term}_weight", (1.0 if w is None else float(w)) if term in named else 0.0)

    @property
    def weights(self) -> dict[str, float]:
        """``{term: weight}`` for every term of :data:`LOSS_TERMS` (0 = off)."""
        return {t: getattr(self, f"{t}_weight") for t in LOSS_TERMS}

    @property
    def uses_fcd(self) -> bool:
        """Whether the FCD term is on (it needs teacher block features)."""
        return self.fcd_weight > 0

    @property
    def uses_kd(self) -> bool:
        """Whether logit KD is on (it needs the teacher's head)."""
        return self.kd_weight > 0

    @property
    def uses_block_features(self) -> bool:
        """Whether a term needs the ``--layer_map`` blocks' outputs (fcd, hidden_mse)."""
        return self.fcd_weight > 0 or self.hidden_mse_weight > 0

    @property
    def uses_attention(self) -> bool:
        """Whether a term needs queries, keys and values inside attention (minilm)."""
        return self.minilm_weight > 0

    @property
    def uses_teacher_logits(self) -> bool:
        """Whether a term needs the teacher's head (kd, dist)."""
        return self.kd_weight > 0 or self.dist_weight > 0

    @property
    def uses_teacher(self) -> bool:
        """Whether any distillation term is on (the teacher runs in training)."""
        return any(w for t, w in self.weights.items() if t != "ce")


@dataclass
class TrainArguments:
    """Schedule, outputs and DeepSpeed. Flags given here override the DeepSpeed JSON; 'auto' values in
    the JSON are filled from them (as the transformers DeepSpeed integration does)."""

    output_dir: str = field(default="outputs/distill_gpt", metadata={"help": "Where the student, checkpoints, metrics and TensorBoard events go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start afresh in an output_dir that holds a run (removes only fcd_ds's own files)."})
    resume: bool = field(default=False, metadata={"help": "Continue from the latest checkpoint in output_dir/checkpoints."})
    auto_resume: bool = field(default=False, metadata={"help": "Resume when output_dir holds a checkpoint of this same run (same arguments), start afresh when it holds none (what launchers/slurm/distill.sbatch passes, so a requeued job continues)."})
    deepspeed_config: str = field(default=str(DEFAULT_DS_CONFIG), metadata={"help": "DeepSpeed JSON (ds_configs/zero{0,1,2,3}.json, zero3_offload.json)."})
    bf16: bool = field(default=False, metadata={"help": "Override: enable the JSON's bf16 section (GPUs; slow on CPU)."})
    fp16: bool = field(default=False, metadata={"help": "Override: enable the JSON's fp16 section with dynamic loss scaling, for GPUs without bf16 (V100, T4); not on CPU."})
    max_steps: int = field(default=120, metadata={"help": "Optimizer steps."})
    learning_rate: float | None = field(default=None, metadata={"help": "Peak learning rate (default: the JSON's, or 5e-4 where it says 'auto')."})
    warmup_steps: int | None = field(default=None, metadata={"help": "Linear warm-up steps (default: the JSON's, or a tenth of max_steps)."})
    per_device_train_batch_size: int | None = field(default=None, metadata={"help": "Micro-batch per rank (default: the JSON's number, else 8 for distill_gpt; 16 for the encoder launchers)."})
    gradient_accumulation_steps: int | None = field(default=None, metadata={"help": "Micro-batches per optimizer step (default: the JSON's, or 1)."})
    train_batch_size: int | None = field(default=None, metadata={"help": "Global batch in sequences, micro-batch x accumulation x ranks (DeepSpeed's train_batch_size): the accumulation is derived from it for the ranks the run has, so a job requeued onto fewer nodes (or moved to more GPUs) keeps its global batch and resumes; not with --gradient_accumulation_steps."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Eval micro-batch per rank."})
    seed: int = field(default=42, metadata={"help": "Seed of init, data order and dropout."})
    logging_steps: int = field(default=1, metadata={"help": "Log to TensorBoard every N steps."})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "Where the scalars go besides train_log.jsonl (transformers' TrainingArguments values): 'tensorboard' (output_dir/runs), 'wandb' (offline unless WANDB_MODE says otherwise; output_dir/wandb), several joined by commas, 'all' (every installed one) or 'none'."})
    save_steps: int = field(default=0, metadata={"help": "Save a DeepSpeed checkpoint every N steps (0: only at the end)."})
    save_total_limit: int = field(default=0, metadata={"help": "Keep only the newest N checkpoints (0: keep all)."})
    teacher_offload: str | None = field(default=None, metadata={"help": "'cpu': the teacher engine runs ZeRO-3 with its parameters offloaded to CPU memory (offload_param), whatever the student's stage; 'none': no offload; default: the JSON's zero_optimization.offload_param when the student runs ZeRO-3.", "choices": ["cpu", "none"]})
    eval_on_start: bool = field(default=True, metadata={"help": "Evaluate the teacher and the untrained student before training (reported as teacher_eval_* and student_eval_*_initial)."})
    eval_steps: int = field(default=0, metadata={"help": "Also evaluate the student every N steps (0: only at the end); logged as eval/* with the training seconds so far."})
    grad_norm_steps: int = field(default=0, metadata={"help": "Every N steps, also log the L2 norm of each weighted loss term's gradient with respect to each --layer_map student block output, grad_norm/<term>/s<block> (one extra backward per term on those steps; needs a block-feature term (fcd, hidden_mse), ZeRO 0-2 and no activation checkpointing); 0 = off."})
    peak_tflops: float | None = field(default=None, metadata={"help": "Peak TFLOP/s of one device, for MFU (e.g. 989 for H100 bf16 dense)."})
    host_memory_reuse: str = field(default="auto", metadata={"help": "Keep freed host memory in glibc's heap for the next step instead of mapping it afresh (fcd_ds.runtime.host_memory; same values, fewer page faults): 'true', 'false', or 'auto' = on when training on CPUs unless LD_PRELOAD, GLIBC_TUNABLES or MALLOC_*_ already set the allocator."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes per rank that read, tokenise (streaming) and collate batches ahead of the step (HF's name); 0: in the training process."})
    dataloader_prefetch_factor: int | None = field(default=None, metadata={"help": "Batches each DataLoader worker prepares ahead (HF's name; torch's default 2 with workers)."})
    ddp_timeout: int = field(default=1800, metadata={"help": "Seconds a collective (a barrier while another rank tokenises, say) may wait before the process group gives up (HF's name and default)."})
    local_rank: int = field(default=-1, metadata={"help": "Set by the deepspeed launcher."})
    config: str | None = field(default=None, metadata={"help": "Recipe file (YAML or JSON) holding any of these flags by name, flat or in the model/data/distill/train groups of a run_config.json; flags on the command line override it, and a finished run's run_config.json given back reproduces the run."})

    def __post_init__(self):
        _finite(self)
        for name in ("max_steps", "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "train_batch_size", "per_device_eval_batch_size", "logging_steps", "peak_tflops",
                     "dataloader_prefetch_factor", "ddp_timeout"):
            _positive(name, getattr(self, name))
        if self.warmup_steps is not None and self.warmup_steps < 1:
            raise UsageError(f"--warmup_steps: must be >= 1 (DeepSpeed's warm-up schedulers need a step; 1 is no warm-up), got {self.warmup_steps}")
        _positive("save_steps", self.save_steps, allow_zero=True)
        _positive("save_total_limit", self.save_total_limit, allow_zero=True)
        _positive("eval_steps", self.eval_steps, allow_zero=True)
        _positive("grad_norm_steps", self.grad_norm_steps, allow_zero=True)
        _positive("dataloader_num_workers", self.dataloader_num_workers, allow_zero=True)
        if self.dataloader_prefetch_factor is not None and not self.dataloader_num_workers:
            raise UsageError("--dataloader_prefetch_factor: needs --dataloader_num_workers > 0 (torch's rule); add workers or drop it")
        check_host_memory_reuse(self.host_memory_reuse)
        if self.train_batch_size is not None and self.gradient_accumulation_steps is not None:
            raise UsageError("--train_batch_size and --gradient_accumulation_steps both set the accumulation; pass one "
                             "(--train_batch_size keeps the global batch when the number of ranks changes)")
        if self.bf16 and self.fp16:
            raise UsageError("--bf16 and --fp16 both set the precision; pass one (--bf16 where the GPU has it)")
        self.report_to = _report_to(self.report_to)
        starts = [f"--{name}" for name in ("resume", "auto_resume", "overwrite_output_dir") if getattr(self, name)]
        if len(starts) > 1:
            raise UsageError(f"{' and '.join(starts)} contradict each other; pass one")


REPORT_TO = ("tensorboard", "wandb")
"""Integrations ``--report_to`` can name (besides ``all`` and ``none``), as transformers' ``report_to``."""


def _report_to(value) -> list[str]:
    """``--report_to`` as a list of :data:`REPORT_TO` names: a name, names joined by commas or a list (a
    recipe's), ``all`` (tensorboard, and wandb when it is installed) or ``none`` / None (``[]``).

    Raises:
        UsageError: an unknown name, ``none`` or ``all`` beside others, or ``wandb`` without the package.
    """
    import importlib.util

    names = [n.strip() for v in ([] if value is None else [value] if isinstance(value, str) else value) for n in str(v).split(",") if n.strip()]
    valid = (*REPORT_TO, "all", "none")
    bad = [n for n in names if n not in valid]
    if bad:
        raise UsageError(f"--report_to: {bad[0]!r} is not one of {', '.join(valid)}; pick from those (several joined by commas)")
    if len(names) > 1 and {"all", "none"} & set(names):
        raise UsageError(f"--report_to: {'all' if 'all' in names else 'none'} stands alone, got {','.join(names)}; pass it alone or name the integrations")
    has_wandb = importlib.util.find_spec("wandb") is not None
    if names == ["all"]:
        return ["tensorboard", *(["wandb"] if has_wandb else [])]
    if "wandb" in names and not has_wandb:
        raise UsageError("--report_to wandb: the wandb package is not installed; `pip install wandb`, or drop wandb from --report_to")
    return list(dict.fromkeys(n for n in names if n != "none"))


def unknown_flags_message(parser, unknown: list[str]) -> str:
    """``unknown argument(s) ...; see --help for the flags``, with the closest valid flag names (difflib) of
    each unknown ``--flag``, as one line."""
    import difflib

    known = [o for action in parser._actions for o in action.option_strings if o.startswith("--") and "-" not in o[2:]]  # not the dash aliases
    close = []
    for arg in unknown:
        if arg.startswith("--"):
            close += [c for c in difflib.get_close_matches(arg.split("=", 1)[0], known, n=3, cutoff=0.6) if c not in close]
    hint = f" (closest: {', '.join(close)})" if close else ""
    return f"unknown argument(s) {' '.join(unknown)}; see --help for the flags{hint}"


# Keys of a run_config.json that record the run rather than set a flag, and flags that say how to start
# an attempt rather than what the run is: a recipe's values for them are not applied.
_RECORD_KEYS = ("launcher", "task", "layer_map", "world_size", "deepspeed_config")
START_FLAGS = ("resume", "auto_resume", "overwrite_output_dir", "local_rank", "config")  # how an attempt starts, not what the run is
_GROUPS = ("model", "data", "distill", "train")


def read_recipe(path: str, known: set[str]) -> dict:
    """The flag values a recipe file sets: a YAML (``yaml.safe_load``: no tags that build objects) or JSON
    mapping of flag names to values, either flat or grouped as in ``run_config.json`` (``model``,
    ``data``, ``distill``, ``train``; its record keys ``launcher``, ``task``, ``world_size`` and the
    resolved ``deepspeed_config`` are not flags and are left out when grouped). The start flags
    (``--resume``, ``--auto_resume``, ``--overwrite_output_dir``, ``--local_rank``, ``--config``) are
    never taken from a recipe. As ``trl``'s and torchtune's ``--config``: the file sets defaults, the
    command line wins.

    Raises:
        UsageError: the file is missing, unreadable, not a mapping, or names a key that is no flag of
            this launcher (with the closest flag names).
    """
    import difflib
    import json

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config: {path} does not exist; pass a YAML or JSON recipe (see recipes/)")
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"--config: cannot read {path} ({first}); fix the file") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config: {path} must hold a mapping of flag names to values, got {type(data).__name__}")
    if any(isinstance(data.get(g), dict) for g in _GROUPS):  # a run_config.json: its groups hold the flags
        flat = {}
        finetune = "model_name_or_path" in known  # launchers/finetune_teacher.py records its model as the student
        for group in _GROUPS:
            if finetune and group == "distill":
                continue  # the task loss alone: no distillation flags
            flat.update(data.get(group) or {})
        if finetune and "student" in flat:
            flat["model_name_or_path"] = flat.pop("student")
            for key in ("teacher", "student_config", "student_num_layers"):
                flat.pop(key, None)
        extra = [k for k in data if k not in _GROUPS and k not in _RECORD_KEYS]
        data = {**flat, **{k: data[k] for k in extra}}
    values = {k.lstrip("-"): v for k, v in data.items()}
    unknown = [k for k in values if k not in known]
    if unknown:
        close = [c for k in unknown for c in difflib.get_close_matches(k, sorted(known), n=1, cutoff=0.6)]
        hint = f" (closest: {', '.join(dict.fromkeys(close))})" if close else ""
        raise UsageError(f"--config: {path} sets {', '.join(unknown)}, which this launcher has no flag for{hint}; fix or remove them")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items() if k not in START_FLAGS}


def _config_path(argv: list[str]) -> str | None:
    """The value of ``--config`` in ``argv`` (``--config FILE`` or ``--config=FILE``), or None."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def parse_args(argv: list[str] | None = None, defaults: dict | None = None, *, finetune: bool = False):
    """Parse the command line into ``(ModelArguments, DataArguments, DistillArguments, TrainArguments)``.

    Args:
        argv: the flags (default ``sys.argv[1:]``).
        defaults: the launcher's own defaults (e.g. ``{"task": "sequence_classification", "output_dir":
            "outputs/distill_bert"}``), applied under the command line and shown by ``--help``.
        finetune: ``launchers/finetune_teacher.py``: the model comes from ``--model_name_or_path``
            (:class:`FinetuneModelArguments`) and the distillation flags do not exist (task loss only).

    Raises:
        UsageError: an unknown flag, or a value out of range (from the dataclasses' checks).
        SystemExit: a value of the wrong type, or ``--help`` (argparse's behaviour).
    """
    from transformers import HfArgumentParser

    model_cls = FinetuneModelArguments if finetune else ModelArguments
    groups = (model_cls, DataArguments, TrainArguments) if finetune else (model_cls, DataArguments, DistillArguments, TrainArguments)
    parser = HfArgumentParser(groups, allow_abbrev=False)  # --resum is not --resume: flags are exact
    if defaults:
        parser.set_defaults(**defaults)
    argv = sys.argv[1:] if argv is None else list(argv)
    recipe = _config_path(argv)
    if recipe is not None:  # under the command line: argparse uses a default only where no flag is given
        parser.set_defaults(**read_recipe(recipe, {a.dest for a in parser._actions}))
    *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        raise UsageError(unknown_flags_message(parser, unknown))
    if finetune:
        model, data, train = parsed
        return model.as_model_arguments(), data, DistillArguments(loss="ce"), train
    return tuple(parsed)
