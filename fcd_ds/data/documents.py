"""Rows -> documents: token ids of one document each, and which of them the task loss reads.

Three row forms, detected from the columns (TRL's SFT dataset forms):

* **text**: a string column (``--text_column``, default ``text``, else the only string column). The
  document is ``BOS + tokens + EOS`` with the tokenizer's own BOS and EOS where it defines them (a BOS
  equal to the EOS is left out: GPT-2's ``<|endoftext|>`` then separates documents once). Masked LM
  ends each document with the tokenizer's separator (``[SEP]`` / ``</s>``) instead, and blocks keep
  their ``[CLS] ... [SEP]`` frame (:mod:`fcd_ds.data.blocks`).
* **messages**: a list of ``{"role", "content"}`` turns, rendered with the tokenizer's chat template
  (``apply_chat_template``; ``--chat_template_path`` overrides it, as TRL's SFT). The template writes
  its own turn markers, so nothing is added around it.
* **prompt / completion**: two strings (``BOS + prompt + completion + EOS``) or two lists of turns (the
  prompt rendered with ``add_generation_prompt=True``, the completion after it).

With ``--assistant_only_loss`` (TRL's name) a ``loss_mask`` (1 = the loss reads this token) marks the
assistant turns' tokens (the template's end-of-turn marker included) or the completion's tokens (and
its EOS); without it every token counts and no mask is stored. Assistant spans are found in the
rendered text: turn ``i`` spans from the end of ``render(turns[:i], add_generation_prompt=True)`` to
the end of ``render(turns[:i + 1])``, and a token belongs to it when its first character does
(fast tokenizers' offsets); a template whose shorter renderings are not prefixes of the whole is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from .sources import RowLocator, describe_columns

__all__ = ["FORMS", "ROLES", "DocumentSpec", "document_markers", "detect_form", "read_chat_template", "DocumentEncoder"]

FORMS = ("text", "messages", "prompt_completion")
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class DocumentSpec:
    """How a row becomes one document.

    Attributes:
        form: one of :data:`FORMS`. text_column: the text column (``text`` form).
        bos, eos: token ids put before and after a text or prompt/completion document.
        assistant_only_loss: store a ``loss_mask`` of assistant / completion tokens.
        chat_template: the template text (``--chat_template_path``), or None for the tokenizer's own.
    """

    form: str
    text_column: str | None = None
    bos: tuple[int, ...] = ()
    eos: tuple[int, ...] = ()
    assistant_only_loss: bool = False
    chat_template: str | None = field(default=None, repr=False)

    def as_record(self) -> dict:
        """JSON record of the spec (a prepared folder's metadata; the template by its text)."""
        return {"form": self.form, "text_column": self.text_column, "bos": list(self.bos), "eos": list(self.eos),
                "assistant_only_loss": self.assistant_only_loss, "chat_template": self.chat_template}


def document_markers(tokenizer, task: str, packing: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(bos, eos)`` token ids around a text document (see the module docstring).

    causal_lm: the tokenizer's BOS (unless it equals its EOS) and EOS, each where defined. masked_lm:
    no BOS and, in packed blocks, the separator (``sep_token_id``, else the EOS) between documents; one
    document per sequence needs none (the block frame ends it).
    """
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    if task == "masked_lm":
        sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else eos_id
        return (), ((sep,) if packing and sep is not None else ())
    bos = (bos_id,) if bos_id is not None and bos_id != eos_id else ()
    return bos, ((eos_id,) if eos_id is not None else ())


def _is_turns(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, dict) for t in value)


def detect_form(columns: list[str], row: dict, text_column: str | None, flag: str, where: str) -> tuple[str, str | None]:
    """``(form, text column)`` of a split from its columns and first row.

    An explicit ``--text_column`` wins; else a ``messages`` column, then ``prompt`` + ``completion``,
    then a ``text`` column, then the only string column.

    Raises:
        UsageError: the named column is missing or holds no text, or no column fits (names them all).
    """
    listed = describe_columns(columns, row)
    if text_column is not None:
        if text_column not in columns:
            raise UsageError(f"--text_column: no column {text_column!r} in {where} (columns: {listed}); pass --text_column NAME")
        value = row.get(text_column)
        if value is not None and not isinstance(value, str):
            raise UsageError(f"--text_column: column {text_column!r} of {where} holds {type(value).__name__}, not text; "
                             "pass the column that holds the text")
        return "text", text_column
    if "messages" in columns:
        if row.get("messages") is not None and not _is_turns(row["messages"]):
            raise UsageError(f"{flag}: column 'messages' of {where} holds {type(row['messages']).__name__}, not a list of "
                             "{role, content} turns; fix it, or pass --text_column for plain text")
        return "messages", None
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion", None
    if "text" in columns:
        return detect_form(columns, row, "text", flag, where)
    strings = [c for c in columns if isinstance(row.get(c), str)]
    if len(strings) == 1:
        return "text", strings[0]
    raise UsageError(f"{flag}: {where} has no 'text' column (columns: {listed}); pass --text_column NAME, or give a "
                     "'messages' column or 'prompt' and 'completion' columns")


def read_chat_template(path: str | None) -> str | None:
    """The template text of ``--chat_template_path`` (a Jinja file, or a ``tokenizer_config.json`` /
    ``chat_template.json`` holding ``chat_template``), or None.

    Raises:
        UsageError: a missing or unreadable file, or a JSON file without ``chat_template``.
    """
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--chat_template_path: {path} does not exist; pass a Jinja template file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"--chat_template_path: {path} is not UTF-8 (byte {exc.start}); save it as UTF-8") from None
    if p.suffix == ".json":
        import json

        try:
            template = json.loads(text).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            template = None
        if not isinstance(template, str):
            raise UsageError(f"--chat_template_path: {path} holds no 'chat_template' string; pass a Jinja file or such a JSON")
        return template
    return text


class DocumentEncoder:
    """Batched ``datasets.map`` function (``with_indices=True``): rows -> ``{"input_ids": [[int]], and with
    assistant_only_loss "loss_mask": [[0/1]]}``, one document per non-empty row (empty or missing text,
    or an empty completion, is skipped: the caller counts rows in against documents out).

    Raises (inside the map):
        UsageError: a row that does not fit its form (a turn with an unknown role, no assistant turn, a
            content that is not a string, a template that cannot render the turns), naming the row and file.
    """

    def __init__(self, tokenizer, spec: DocumentSpec, flag: str, locate: RowLocator):
        self.tokenizer, self.spec, self.flag, self.locate = tokenizer, spec, flag, locate

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        spec = self.spec
        if spec.form == "text":
            texts = batch[spec.text_column]
            for t, i in zip(texts, indices):
                if t is not None and not isinstance(t, str):
                    self._fail(i, f"column {spec.text_column!r} holds {type(t).__name__}, not text")
            enc = self.tokenizer([t for t in texts if t], add_special_tokens=False, verbose=False)["input_ids"]
            return {"input_ids": [[*spec.bos, *e, *spec.eos] for e in enc]}  # plain text has no assistant mask (the plan refuses the flag)
        if spec.form == "messages":
            rendered = [self._render_turns(turns, i) for turns, i in zip(batch["messages"], indices)]
        else:
            rendered = [self._render_pair(p, c, i) for p, c, i in zip(batch["prompt"], batch["completion"], indices)]
        rendered = [r for r in rendered if r is not None]
        texts = [r for r in rendered if isinstance(r[0], str)]  # (text, spans): tokenised together, with offsets
        enc = self.tokenizer([t for t, _ in texts], add_special_tokens=False, return_offsets_mapping=True, verbose=False) if texts else None
        ids, masks, k = [], [], 0
        for r in rendered:
            if isinstance(r[0], str):
                spans, offsets = r[1], enc["offset_mapping"][k]
                ids.append(enc["input_ids"][k])
                masks.append([int(any(s <= start < e for s, e in spans)) for start, _ in offsets])
                k += 1
            else:  # (ids, mask) of a prompt/completion pair of strings
                ids.append(r[0])
                masks.append(r[1])
        return {"input_ids": ids, **({"loss_mask": masks} if spec.assistant_only_loss else {})}

    def _fail(self, index: int, problem: str):
        raise UsageError(f"{self.flag}: {self.locate(index)}: {problem}; fix the row")

    def _template(self, turns: list, index: int, **kwargs) -> str:
        try:
            return self.tokenizer.apply_chat_template(turns, tokenize=False, chat_template=self.spec.chat_template, **kwargs)
        except Exception as exc:  # noqa: BLE001  (jinja errors, raise_exception in templates)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self._fail(index, f"the chat template cannot render its turns ({first})")

    def _check_turns(self, turns, index: int, need_assistant: bool) -> None:
        if not _is_turns(turns) or not turns:
            self._fail(index, "'messages' is not a non-empty list of {role, content} turns")
        for t in turns:
            if t.get("role") not in ROLES:
                self._fail(index, f"role {t.get('role')!r} is not one of {', '.join(ROLES)}")
            if not isinstance(t.get("content"), str):
                self._fail(index, f"the content of a {t.get('role')} turn is {type(t.get('content')).__name__}, not a string")
        if need_assistant and not any(t["role"] == "assistant" for t in turns):
            self._fail(index, "no assistant turn (nothing for the student to learn to answer)")

    def _render_turns(self, turns, index: int):
        """``(text, [(start, end) character spans of the assistant turns])``."""
        if turns is None:
            return None
        self._check_turns(turns, index, need_assistant=True)
        text = self._template(turns, index)
        spans = []
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            before = self._template(turns[:i], index, add_generation_prompt=True) if i else ""
            through = self._template(turns[: i + 1], index)
            if not (text.startswith(through) and through.startswith(before)):
                self._fail(index, "the chat template's rendering of the first turns is not a prefix of the whole; "
                                  "assistant tokens cannot be located (pass a --chat_template_path whose turns render in order)")
            spans.append((len(before), len(through)))
        return text, spans

    def _render_pair(self, prompt, completion, index: int):
        if prompt is None or completion is None or completion == "" or completion == []:
            return None
        if isinstance(prompt, str) and isinstance(completion, str):
            p = self.tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
            c = self.tokenizer(completion, add_special_tokens=False, verbose=False)["input_ids"]
            spec = self.spec
            return [*spec.bos, *p, *c, *spec.eos], [0] * (len(spec.bos) + len(p)) + [1] * (len(c) + len(spec.eos))
        if _is_turns(prompt) and _is_turns(completion):
            self._check_turns(prompt + completion, index, need_assistant=False)
            before = self._template(prompt, index, add_generation_prompt=True)
            text = self._template(prompt + completion, index)
            if not text.startswith(before):
                self._fail(index, "the chat template's rendering of the prompt is not a prefix of prompt + completion")
            return text, [(len(before), len(text))]
        self._fail(index, f"'prompt' and 'completion' must both be strings or both lists of turns, got "
                          f"{type(prompt).__name__} and {type(completion).__name__}")
