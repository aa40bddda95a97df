"""The model card (README.md) written into the exported student folder, as Hugging Face model cards:
YAML front matter, then teacher, method and loss weights, layer map, data, steps and held-out metrics."""

from __future__ import annotations

__all__ = ["model_card"]


def _table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]])


def model_card(plan, metrics: dict, world_size: int) -> str:
    """Markdown model card of a finished run.

    Args:
        plan: the :class:`~fcd_ds.plan.RunPlan`. metrics: the run's ``metrics.json`` content
            (``teacher_eval_<m>``, ``student_eval_<m>_initial``, ``student_eval_<m>``, ``steps``, ...).
        world_size: data-parallel ranks of the run.

    Returns:
        The card's text.
    """
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
        terms.append(f"{a.fcd_weight} x FCD (alpha {a.fcd_alpha}, beta {a.fcd_beta}, {a.fcd_sequence_relation} sequence relation)")
    if a.uses_kd:
        terms.append(f"{a.kd_weight} x logit KD (T = {a.kd_temperature})")
    if a.hidden_mse_weight:
        terms.append(f"{a.hidden_mse_weight} x hidden-state MSE (TinyBERT)")
    if a.minilm_weight:
        terms.append(f"{a.minilm_weight} x MiniLMv2 attention relations ({a.minilm_relation_heads} relation heads, map `{a.minilm_layer_map}`)")
    if a.dist_weight:
        terms.append(f"{a.dist_weight} x DIST (T = {a.dist_temperature})")
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
                 ("layer map (student:teacher@weight)", f"`{','.join(f'{p.student}:{p.teacher}@{p.weight:g}' for p in plan.pairs) or '-'}`")]
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
    return "\n".join([
        "---",
        "library_name: transformers",
        "tags: [fcd_ds, knowledge-distillation" + ("" if finetune else ", fcd") + "]",
        "---",
        f"# {title} ({plan.launcher.name}, fcd_ds)",
        "",
        _table(rows),
        "",
        *lines,
        "",
        f"Load it with `{task.auto_class.__name__}.from_pretrained(<this folder>)`.",
        "",
    ])
