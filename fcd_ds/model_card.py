"""The model card (README.md) written into the exported student folder, as Hugging Face model cards:
YAML front matter with the Hub metadata (rendered by ``huggingface_hub.ModelCardData``), then teacher,
method and loss weights, layer map, data, steps and held-out metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .layer_map import layer_map_to_str

__all__ = ["model_card", "card_data", "hub_origin", "PIPELINE_TAGS"]

PIPELINE_TAGS = {"causal_lm": "text-generation", "masked_lm": "fill-mask", "sequence_classification": "text-classification"}
"""The Hub's ``pipeline_tag`` of each task."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as huggingface_hub's validate_repo_id allows
_SNAPSHOT = re.compile(r"models--(.+?)/snapshots/[^/]+$")  # a folder of the Hugging Face cache: models--org--name/snapshots/<rev>


def _card(readme: Path):
    """The ``huggingface_hub.ModelCard`` of a README.md file, or None (no file, or front matter it cannot read)."""
    from huggingface_hub import ModelCard

    if not readme.is_file():
        return None
    try:
        return ModelCard.load(readme)
    except (ValueError, OSError):  # a README.md whose YAML is not a model card's: no metadata to take
        return None


def hub_origin(model: str) -> tuple[str | list[str] | None, str | None]:
    """The Hub model that ``model`` (a ``--teacher`` or ``--model_name_or_path`` value) is, or derives
    from, and its license, as the card's ``base_model`` and ``license``. Reads local files only.

    * a Hub name (no such local path): that name; the license from its README.md in the Hugging Face
      cache when transformers downloaded it there (``try_to_load_from_cache``), else None;
    * a folder of the Hugging Face cache (``.../models--org--name/snapshots/<rev>``): ``org/name``;
    * a folder whose README.md front matter fcd_ds wrote (tag ``fcd_ds``: the assets' copies of Hub models,
      an exported student or fine-tuned model): the ``base_model`` recorded there, the nearest Hub model;
    * a folder whose ``config.json`` ``_name_or_path`` is a Hub id (``org/name``, not a local path; what
      transformers 4 recorded on ``save_pretrained`` of a Hub model): that id;
    * otherwise None: the card's text names the folder. A README.md of another origin gives its license
      but not its ``base_model`` (that is the folder's parent, not the folder).

    Returns:
        ``(base_model, license)``, each None when unknown.
    """
    from huggingface_hub import try_to_load_from_cache

    path = Path(model).expanduser()
    if not path.exists():
        cached = try_to_load_from_cache(model, "README.md")
        card = _card(Path(cached)) if isinstance(cached, str) else None
        return model, (card.data.license if card else None)
    card = _card(path / "README.md")
    license_ = card.data.license if card else None
    snapshot = _SNAPSHOT.search(path.resolve().as_posix())
    if snapshot:
        return snapshot.group(1).replace("--", "/", 1), license_
    if card and "fcd_ds" in (card.data.tags or []) and card.data.base_model:
        return card.data.base_model, license_
    try:
        name = json.loads((path / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        name = None
    if isinstance(name, str) and _HUB_ID.match(name) and not Path(name).exists():
        return name, license_
    return None, license_


def _as_list(base: str | list[str] | None) -> list[str]:
    return [] if base is None else [base] if isinstance(base, str) else list(base)


def _is_hub_dataset(name: str | None) -> bool:
    return bool(name) and not Path(name).expanduser().exists()


def card_data(plan, metrics: dict):
    """The card's Hub metadata (``huggingface_hub.ModelCardData``): ``base_model`` (the teacher's Hub
    origin, :func:`hub_origin`, with a pretrained ``--student``'s after it; for launchers/finetune_teacher.py
    the fine-tuned model's), ``license`` (the teacher's, or the fine-tuned model's), ``datasets`` (a Hub
    ``--dataset_name``; local files are not Hub datasets), ``pipeline_tag`` (:data:`PIPELINE_TAGS`),
    ``library_name: transformers``, ``tags`` (``fcd_ds``, ``knowledge-distillation`` and the loss terms
    on) and, with a Hub dataset, the student's held-out metrics as ``model-index`` eval results.
    ``base_model_relation`` is left out: the Hub knows adapter, merge, quantized and finetune, not distillation.
    """
    from huggingface_hub import EvalResult, ModelCardData

    d, a, m = plan.data_args, plan.distill_args, plan.model_args
    finetune = plan.teacher is None
    base, license_ = hub_origin(m.student if finetune else plan.teacher)
    bases = _as_list(base)
    if not finetune and m.student is not None:  # a pretrained student: its weights derive from its own origin too
        bases += [b for b in _as_list(hub_origin(m.student)[0]) if b not in bases]
    pipeline = PIPELINE_TAGS[plan.task.name]
    hub_data = _is_hub_dataset(d.dataset_name)
    config_name = d.dataset_config_name or d.task_name
    names = sorted(k[len("student_eval_"):] for k in metrics if k.startswith("student_eval_") and not k.endswith("_initial"))
    results = [EvalResult(task_type=pipeline, dataset_type=d.dataset_name, dataset_name=d.dataset_name, dataset_config=config_name,
                          dataset_split=d.validation_split, metric_type=n, metric_value=metrics[f"student_eval_{n}"])
               for n in names if isinstance(metrics.get(f"student_eval_{n}"), (int, float))] if hub_data else []
    methods = [] if finetune else [t.replace("_", "-") for t, w in a.weights.items() if w and t != "ce"]
    return ModelCardData(
        base_model=(bases[0] if len(bases) == 1 else bases) or None,
        license=license_,
        datasets=[d.dataset_name] if hub_data else None,
        pipeline_tag=pipeline,
        library_name="transformers",
        tags=["fcd_ds", *([] if finetune else ["knowledge-distillation", *methods])],
        model_name=Path(plan.train_args.output_dir).resolve().name if results else None,
        eval_results=results or None,
    )


def _table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]])


def model_card(plan, metrics: dict, world_size: int) -> str:
    """Markdown model card of a finished run: :func:`card_data`'s YAML front matter, then the tables.

    Args:
        plan: the :class:`~fcd_ds.plan.RunPlan`. metrics: the run's ``metrics.json`` content
            (``teacher_eval_<m>``, ``student_eval_<m>_initial``, ``student_eval_<m>``, ``steps``, ...).
        world_size: data-parallel ranks of the run.

    Returns:
        The card's text (``huggingface_hub.ModelCard.load`` reads it back).
    """
    from huggingface_hub import ModelCard

    d, a, t, m = plan.data_args, plan.distill_args, plan.train_args, plan.model_args
    task = plan.task
    finetune = plan.teacher is None
    if m.student is not None:
        source = f"pretrained `{m.student}`"
    elif m.student_config is not None:
        source = f"fresh from config `{m.student_config}` (random init)"
    else:
        source = f"the teacher depth-pruned to {m.student_num_layers} blocks"
    cfg = plan.student_config
    terms = [f"{a.ce_weight} x task loss"] if a.ce_weight else []
    if a.uses_fcd:
        terms.append(f"{a.fcd_weight} x FCD (alpha {a.fcd_alpha}, beta {a.fcd_beta}, {a.fcd_sequence_relation} sequence relation"
                     + (f" at {a.fcd_sequence_positions} positions" if a.fcd_sequence_positions else "")
                     + (f", weight {a.fcd_weight_schedule} to 0" if a.fcd_weight_schedule != "constant" else "") + ")")
    if a.uses_kd:
        terms.append(f"{a.kd_weight} x logit KD (T = {a.kd_temperature})")
    if a.hidden_mse_weight:
        terms.append(f"{a.hidden_mse_weight} x hidden-state MSE (TinyBERT)")
    if a.minilm_weight:
        terms.append(f"{a.minilm_weight} x MiniLMv2 attention relations ({a.minilm_relation_heads} relation heads, map `{a.minilm_layer_map}`)")
    if a.dist_weight:
        terms.append(f"{a.dist_weight} x DIST (T = {a.dist_temperature})")
    if a.loss_balancer:
        terms.append(f"feature terms rescaled each step to {a.loss_balancer} x the logit loss (--loss_balancer)")
    held_out = d.validation_file or f"last {d.validation_split_percentage} %"
    if d.dataset_name:
        data = f"`{d.dataset_name}`" + (f" / {d.dataset_config_name or d.task_name}" if (d.dataset_config_name or d.task_name) else "")
    elif d.train_file:
        data = f"`{d.train_file}` (held out: `{held_out}`)"
    else:
        data = f"prepared blocks `{d.dataset_prepared_path}`"
    if getattr(d, "assistant_only_loss", False):
        data += ", loss on the assistant's tokens"
    rows = [
        ("task", f"`{task.name}`" + (f" ({', '.join(task.labels.names) or 'regression'})" if hasattr(task, "labels") else "")),
        ("model", f"{cfg.model_type}, {cfg.num_hidden_layers} blocks x {cfg.hidden_size}; {source}"),
    ]
    if not finetune:
        rows += [("teacher", f"`{plan.teacher}` ({plan.teacher_config.num_hidden_layers} blocks x {plan.teacher_config.hidden_size})"),
                 ("method", "FCD, Feature Correlation Distillation (Huang, Guo, Wang, NeurIPS 2023)" if a.uses_fcd else f"--loss {'+'.join(t for t, w in a.weights.items() if w)}"),
                 ("loss", " + ".join(terms) or "-"),
                 ("layer map (student:teacher@weight)", f"`{layer_map_to_str(plan.pairs) or '-'}`")]
    else:
        rows.append(("training", "fine-tuned on the task loss alone (launchers/finetune_teacher.py)"))
    rows += [
        ("data", f"{data}, {d.max_seq_length} tokens per sequence"),
        ("steps", f"{metrics.get('steps')} optimizer steps x {plan.ds_config['train_micro_batch_size_per_gpu']} per rank x "
                  f"{plan.ds_config.get('gradient_accumulation_steps', 1)} accumulation x {world_size} ranks, seed {t.seed}"),
    ]
    names = sorted({k[len("student_eval_"):] for k in metrics if k.startswith("student_eval_") and not k.endswith("_initial")})
    lines = ["| metric (held out) | teacher | student before | student after |", "|---|---|---|---|"]
    for n in names:
        cells = [metrics.get(f"teacher_eval_{n}"), metrics.get(f"student_eval_{n}_initial"), metrics.get(f"student_eval_{n}")]
        lines.append(f"| {n} | " + " | ".join("-" if v is None else f"{v:.4g}" for v in cells) + " |")
    title = "Fine-tuned" if finetune else "Distilled student"
    return str(ModelCard("\n".join([
        "---",
        card_data(plan, metrics).to_yaml(),
        "---",
        f"# {title} ({plan.launcher.name}, fcd_ds)",
        "",
        _table(rows),
        "",
        *lines,
        "",
        f"Load it with `{task.auto_class.__name__}.from_pretrained(<this folder>)`.",
        "",
    ])))
