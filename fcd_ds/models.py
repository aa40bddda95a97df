"""Teacher and student construction through the transformers Auto classes (no per-model code): the
task chooses the class (``AutoModelForCausalLM``, ``AutoModelForMaskedLM``, ``AutoModel``,
``AutoModelForSequenceClassification``), so GPT-2, Llama, BERT, RoBERTa and MPNet load alike.

The student is one of:
* a pretrained model (``--student PATH``),
* a fresh model from a config file (``--student_config config.json``, random init),
* the teacher depth-pruned to K blocks (``--student_num_layers K``): K evenly spaced teacher blocks
  (first and last included) are copied with the embeddings, final norm and LM head, read straight from
  the teacher's safetensors files (so even a teacher that only fits sharded never has to be whole);
  a head the teacher's checkpoint lacks (e.g. a classifier on a plain encoder) is freshly initialised,
  as ``from_pretrained`` does.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from .errors import UsageError
from .features import block_path

__all__ = [
    "load_config",
    "load_tokenizer",
    "check_same_tokenizer",
    "kept_teacher_blocks",
    "pruned_student_config",
    "prune_teacher",
    "load_causal_lm",
    "load_model",
    "max_positions",
    "check_weight_files",
    "check_attn_implementation",
    "revision_unused_warning",
]

# Models whose position ids start after the padding index (RoBERTa's ``create_position_ids_from_input_ids``):
# max_position_embeddings counts pad_token_id + 1 positions that no token can use.
_PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet", "longformer", "data2vec-text")


def _remote_code_hint(exc: Exception) -> str:
    """A pointer to --trust_remote_code when transformers refused a folder's own code."""
    return "; it ships its own code, which runs only with --trust_remote_code (pass it if you trust the folder)" if "trust_remote_code" in str(exc) else ""


def load_config(name_or_path: str, flag: str, *, trust_remote_code: bool = False, revision: str | None = None) -> PretrainedConfig:
    """``AutoConfig.from_pretrained`` with a one-line :class:`UsageError` naming ``flag`` on failure.

    ``name_or_path`` may be a model folder, a ``config.json`` file, or a hub name, read at ``revision``
    (``--revision``: branch, tag or commit; None: ``main``; a folder or file ignores it, as transformers does). A folder whose config
    maps to its own code (``auto_map``) is refused unless ``trust_remote_code`` (``--trust_remote_code``):
    transformers is told ``trust_remote_code=False``, so it never asks on stdin and never runs the code.
    """
    path = Path(name_or_path)
    try:
        if path.is_file():
            data = json.loads(path.read_text())
            model_type = data.pop("model_type", None)
            if model_type is None:
                raise UsageError(f"{flag}: {path} has no 'model_type'; add e.g. \"model_type\": \"gpt2\"")
            return AutoConfig.for_model(model_type, **data)
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    except UsageError:
        raise
    except Exception as exc:  # OSError (missing), JSONDecodeError, ValueError (unknown type), hub errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fix = _remote_code_hint(exc) or "; pass a model folder or config.json"
        raise UsageError(f"{flag}: cannot load a model config from {name_or_path!r} ({first}){fix}") from None


def load_tokenizer(name_or_path: str, flag: str, *, trust_remote_code: bool = False, revision: str | None = None) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` (``trust_remote_code`` and ``revision`` as :func:`load_config`) with a
    :class:`UsageError` naming ``flag`` on failure."""
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{flag}: cannot load a tokenizer from {name_or_path!r} ({first}){_remote_code_hint(exc)}") from None


def check_same_tokenizer(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> None:
    """FCD compares token positions one to one, so both models must split text identically.

    Raises:
        UsageError: the vocabularies differ.
    """
    if teacher.get_vocab() != student.get_vocab():
        raise UsageError(
            f"--student: its tokenizer differs from the teacher's (vocab {len(student)} vs {len(teacher)}); "
            "FCD pairs tokens one to one: use a student with the teacher's tokenizer, or --student_num_layers"
        )


def max_positions(config: PretrainedConfig) -> int | None:
    """Longest sequence the model's position embeddings allow (``max_position_embeddings`` / ``n_positions``;
    RoBERTa-style models lose ``pad_token_id + 1`` of them: 514 -> 512)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and getattr(config, "model_type", None) in _PADDING_OFFSET_POSITIONS:
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    return limit


def kept_teacher_blocks(n_teacher: int, k: int) -> list[int]:
    """K evenly spaced teacher block indices, first and last included: ``round(linspace(0, L-1, K))``.

    Raises:
        UsageError: ``k`` not in [1, n_teacher].
    """
    if not 1 <= k <= n_teacher:
        raise UsageError(f"--student_num_layers: {k} is not in 1..{n_teacher} (the teacher's block count)")
    if k == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (k - 1)) for i in range(k)]


def pruned_student_config(teacher_config: PretrainedConfig, k: int) -> PretrainedConfig:
    """The teacher's config with K blocks (per-layer lists such as ``layer_types`` sliced alike)."""
    kept = kept_teacher_blocks(teacher_config.num_hidden_layers, k)
    cfg = copy.deepcopy(teacher_config)
    cfg.num_hidden_layers = k
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == teacher_config.num_hidden_layers:
        cfg.layer_types = [layer_types[i] for i in kept]
    return cfg


def _weight_files(name_or_path: str, revision: str | None = None) -> list[Path]:
    path = Path(name_or_path)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(name_or_path, revision=revision, allow_patterns=["*.safetensors", "*.json"]))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UsageError(f"--student_num_layers: no *.safetensors weights in {path}; save the teacher with save_pretrained")
    return files


def check_weight_files(name_or_path: str, flag: str, use_safetensors: bool = True) -> None:
    """Check every ``*.safetensors`` file of a local model folder against its own header: the header's
    last tensor must end at the file's end (the safetensors format: an 8-byte little-endian header length,
    the JSON header, then the tensor bytes at the header's ``data_offsets``). Reads the headers only.
    A folder whose only weights are pickled ``*.bin`` files is refused unless ``use_safetensors`` is False
    (``--use_safetensors false``). A hub name, or a folder without weight files, is left to the loader.

    Raises:
        UsageError: a file is truncated, or its header cannot be read; only .bin weights by default; names
            the file and the fix.
    """
    path = Path(name_or_path)
    if not path.is_dir():
        return
    files = sorted(path.glob("*.safetensors"))
    if use_safetensors and not files and any(path.glob("*.bin")):
        raise UsageError(f"{flag}: {path} has only pickled .bin weights (unpickling can run code); pass --use_safetensors false "
                         "if you trust the folder, or save it again with save_pretrained (safetensors)")
    for file in files:
        size = file.stat().st_size
        try:
            with open(file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if size < 8 or n > size - 8:
                    raise ValueError
                header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            raise UsageError(f"{flag}: {file} is not a readable safetensors file (its header is damaged); copy or save it again") from None
        if 8 + n + end > size:
            raise UsageError(f"{flag}: {file} is truncated ({size:,} bytes, its header needs {8 + n + end:,}); copy or save it again")


def check_attn_implementation(value: str | None, device: str, dtype: torch.dtype) -> None:
    """Refuse ``--attn_implementation flash_attention_2`` where it cannot run, before any model is built:
    transformers' own test (``transformers.utils.is_flash_attn_2_available``: the flash_attn package >= 2.3.3
    and a CUDA device), then the dtypes its kernels take (float16, bfloat16). Without this, transformers
    fails only once the model is built (or, with the ``kernels`` package, fetches a kernel from the hub).
    ``eager``, ``sdpa`` and None are left to transformers.

    Args:
        value: ``--attn_implementation``. device: the DeepSpeed accelerator's name (``cuda``, ``cpu``, ...).
        dtype: the models' dtype (:func:`~fcd_ds.build.model_dtype`).

    Raises:
        UsageError: flash_attention_2 on a non-CUDA accelerator, without flash_attn, or in float32.
    """
    if value != "flash_attention_2":
        return
    import importlib.util

    from transformers.utils import is_flash_attn_2_available

    if device != "cuda" or not is_flash_attn_2_available():
        why = (f"the {device} accelerator is not CUDA" if device != "cuda"
               else "the flash_attn package is not installed" if importlib.util.find_spec("flash_attn") is None
               else "transformers finds no usable flash_attn (>= 2.3.3) with a CUDA device")
        raise UsageError(f"--attn_implementation flash_attention_2: {why}; use sdpa (or eager), or run on a CUDA GPU with flash-attn installed")
    if dtype not in (torch.float16, torch.bfloat16):
        raise UsageError(f"--attn_implementation flash_attention_2: its kernels take fp16 or bf16, and the models are {dtype}; add --bf16 (or --fp16), or use sdpa")


def revision_unused_warning(revision: str | None, models: dict[str, str | None]) -> str | None:
    """The one-line warning when ``--revision`` is set but every model given (``{flag: path}``; None =
    not given) is a local folder or file, which transformers reads as it is; None otherwise."""
    given = [flag for flag, path in models.items() if path is not None]
    if revision is None or not given or not all(Path(models[flag]).exists() for flag in given):
        return None
    return (f"warning: --revision {revision} has no effect: {', '.join(given)} {'is a local path' if len(given) == 1 else 'are local paths'} "
            "(a revision selects a commit of a hub name)")


def prune_teacher(
    teacher: str,
    teacher_config: PretrainedConfig,
    k: int,
    dtype: torch.dtype,
    auto_class=AutoModelForCausalLM,
    config_updates: dict | None = None,
    *,
    revision: str | None = None,
    attn_implementation: str | None = None,
) -> nn.Module:
    """Build a K-block student from the teacher's weights (see module docstring).

    Args:
        teacher: teacher folder or hub name with safetensors weights.
        teacher_config: its config. k: student block count. dtype: student parameter dtype.
        auto_class: the task's Auto class. config_updates: attributes set on the student config
            (``num_labels``, ``id2label``, ...).
        revision: ``--revision`` of a hub-name teacher (its weights are read at that commit).
        attn_implementation: ``--attn_implementation`` of the student (None: transformers' choice).

    Returns:
        The student on CPU; every parameter of the base model loaded from the teacher, the head too when
        the teacher's checkpoint has it.

    Raises:
        UsageError: bad ``k`` or no safetensors file. RuntimeError: a base-model tensor has no teacher source.
    """
    from safetensors import safe_open

    kept = kept_teacher_blocks(teacher_config.num_hidden_layers, k)
    cfg = pruned_student_config(teacher_config, k)
    for key, value in (config_updates or {}).items():
        setattr(cfg, key, value)
    student = auto_class.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
    prefix = block_path(student) + "."
    base = getattr(student, "base_model_prefix", "")
    wanted = {}  # teacher key -> student key
    for key in student.state_dict():
        source = key
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            source = f"{prefix}{kept[int(index)]}.{rest}"
        wanted[source] = key
        if base and source.startswith(base + "."):  # a checkpoint of the bare base model has no prefix
            wanted.setdefault(source[len(base) + 1 :], key)
    state = {}
    for file in _weight_files(teacher, revision):
        with safe_open(str(file), framework="pt") as f:
            for tkey in f.keys():
                if tkey in wanted and wanted[tkey] not in state:
                    state[wanted[tkey]] = f.get_tensor(tkey).to(dtype)
    missing, unexpected = student.load_state_dict(state, strict=False)
    # A missing key is fine if it is tied to a loaded parameter (e.g. lm_head.weight = embed_tokens), or
    # if it belongs to a head that the teacher's checkpoint does not have at all (fresh, as from_pretrained).
    params = dict(student.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
    head_loaded = any(not k.startswith(base + ".") for k in state) if base else True
    untied = [
        k for k in missing
        if (k not in params or params[k].data_ptr() not in loaded_ptrs) and (head_loaded or k.startswith(base + "."))
    ]
    if untied or unexpected:
        raise RuntimeError(f"pruning {teacher}: no teacher weights for {untied}; unexpected {unexpected}")
    return student


def load_model(name_or_path: str, auto_class, dtype: torch.dtype, flag: str, config_updates: dict | None = None, *,
               trust_remote_code: bool = False, use_safetensors: bool = True, revision: str | None = None,
               attn_implementation: str | None = None) -> nn.Module:
    """``auto_class.from_pretrained`` with ``config_updates`` as config overrides (a ZeRO-3
    ``HfDeepSpeedConfig`` alive around this call makes transformers build it already partitioned).
    Weights are read from safetensors files only unless ``use_safetensors`` is False (``--use_safetensors
    false``: pickled ``.bin`` files too, which transformers loads with ``weights_only=True``); a model's own
    code runs only with ``trust_remote_code``. A hub name is read at ``revision`` (``--revision``; a folder
    ignores it); ``attn_implementation`` is transformers' (``--attn_implementation``; None: its own choice).

    Raises:
        UsageError: naming ``flag``, when the folder or hub name does not hold such a model.
    """
    try:
        return auto_class.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code,
                                          use_safetensors=use_safetensors, revision=revision,
                                          attn_implementation=attn_implementation, **(config_updates or {}))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        safetensors = "; it has no safetensors weights: pass --use_safetensors false to read its .bin files" if "safetensors" in first.lower() and use_safetensors else ""
        raise UsageError(f"{flag}: cannot load a {auto_class.__name__} from {name_or_path!r} ({first}){_remote_code_hint(exc) or safetensors}") from None


def load_causal_lm(name_or_path: str, dtype: torch.dtype, flag: str) -> nn.Module:
    """:func:`load_model` with ``AutoModelForCausalLM``."""
    return load_model(name_or_path, AutoModelForCausalLM, dtype, flag)
