"""Documents -> training sequences, and sequences -> padded tensors.

**Packing** (``--packing true``, the default; transformers' ``run_clm.py`` ``group_texts``): the
documents of each batch of :data:`PACK_GROUP` documents are concatenated and cut into blocks of
``max_seq_length`` tokens (minus a frame, see below); the group's last partial block is dropped. Every
block is full, and ``document_starts`` records the offsets inside it where a document begins (for
per-document position ids and attention). Packed sequences attend across document boundaries (a token
sees the earlier documents of its block, after their EOS), as in GPT-style pretraining, unless
per-document attention is asked for (:func:`position_ids_from_starts`).

**One document per sequence** (``--packing false``): each document is truncated to ``max_seq_length``
tokens and padded in :func:`pad_rows` (``attention_mask`` 0 on padding).

Encoders' blocks are framed by the tokenizer's own special tokens (``[CLS] ... [SEP]``,
``<s> ... </s>``), the text filling the other positions.

Everything here works on Arrow tables (``datasets``' ``with_format("arrow")`` maps), vectorised with
NumPy: packing costs little beside tokenisation.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

__all__ = ["PACK_GROUP", "special_token_frame", "pack_table", "truncate_table", "pad_rows", "pad_batch_to", "position_ids_from_starts", "PAD_VALUES"]

PACK_GROUP = 1000  # documents concatenated per packing group (run_clm's map batch size)


def special_token_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one sequence (``[CLS]``/``[SEP]`` for BERT,
    ``<s>``/``</s>`` for RoBERTa, none for byte-level BPE decoders), read off its own output for a one-token text."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    start = next(i for i in range(len(framed)) if framed[i : i + len(bare)] == bare)
    return framed[:start], framed[start + len(bare) :]


def _list_array(values: np.ndarray, offsets: np.ndarray, dtype) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=dtype))


def _framed(blocks: np.ndarray, prefix: list[int], suffix: list[int]) -> np.ndarray:
    if not (prefix or suffix):
        return blocks
    rows = blocks.shape[0]
    pre = np.broadcast_to(np.asarray(prefix, dtype=blocks.dtype), (rows, len(prefix)))
    post = np.broadcast_to(np.asarray(suffix, dtype=blocks.dtype), (rows, len(suffix)))
    return np.concatenate([pre, blocks, post], axis=1)  # (rows, len(prefix) + body + len(suffix))


def pack_table(table: pa.Table, max_seq_length: int, prefix: list[int] = (), suffix: list[int] = ()) -> pa.Table:
    """One packing group: a table of documents (``input_ids``, optional ``loss_mask``) -> blocks.

    Args:
        table: rows ``input_ids`` list<int>, optionally ``loss_mask`` list<int> of the same lengths.
        max_seq_length: tokens per block, frame included. prefix, suffix: the frame (encoders).

    Returns:
        A table of ``input_ids`` (each ``max_seq_length`` int32), ``document_starts`` (int32 offsets > 0
        where a document begins inside the block, frame included) and ``loss_mask`` (int8, frame 0) when
        the input has one. Empty when the group holds less than one block.
    """
    body = max_seq_length - len(prefix) - len(suffix)
    ids = table.column("input_ids").combine_chunks()
    values = ids.flatten().to_numpy(zero_copy_only=False).astype(np.int32)  # (T,) every token of the group
    doc_offsets = ids.offsets.to_numpy()[:-1] - ids.offsets.to_numpy()[0]  # (D,) where each document starts
    rows = len(values) // body
    blocks = _framed(values[: rows * body].reshape(rows, body), list(prefix), list(suffix))  # (rows, max_seq_length)
    starts = doc_offsets[(doc_offsets < rows * body) & (doc_offsets % body != 0)]  # (S,) ascending
    block_of = starts // body
    per_block = np.searchsorted(block_of, np.arange(rows + 1))  # (rows + 1,) offsets into starts
    out = {
        "input_ids": _list_array(blocks.reshape(-1), np.arange(rows + 1) * max_seq_length, pa.int32()),
        "document_starts": _list_array((starts % body + len(prefix)).astype(np.int32), per_block, pa.int32()),
    }
    if "loss_mask" in table.column_names:
        mask = table.column("loss_mask").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.int8)
        framed = _framed(mask[: rows * body].reshape(rows, body), [0] * len(prefix), [0] * len(suffix))
        out["loss_mask"] = _list_array(framed.reshape(-1), np.arange(rows + 1) * max_seq_length, pa.int8())
    return pa.table(out)


def truncate_table(table: pa.Table, max_seq_length: int, prefix: list[int] = (), suffix: list[int] = ()) -> pa.Table:
    """One document per sequence: each document truncated to ``max_seq_length`` tokens (frame included)
    and framed; ``loss_mask`` alike (frame 0). Lengths vary: :func:`pad_rows` pads them."""
    body = max_seq_length - len(prefix) - len(suffix)
    cols = {"input_ids": pa.int32(), "loss_mask": pa.int8()}
    out = {}
    for name, dtype in cols.items():
        if name not in table.column_names:
            continue
        frame = (list(prefix), list(suffix)) if name == "input_ids" else ([0] * len(prefix), [0] * len(suffix))
        docs = table.column(name).to_pylist()
        out[name] = pa.array([frame[0] + d[:body] + frame[1] for d in docs], type=pa.list_(dtype))
    return pa.table(out)


def pad_rows(sequences: list, length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists (or 1-D tensors) to ``length``: ``(ids (B, length) long, attention_mask (B, length)
    long)``; sequences of exactly ``length`` (packed blocks) come back with a mask of ones."""
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        seq = torch.as_tensor(seq, dtype=torch.long)[:length]
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
    return ids, mask


PAD_VALUES = {"labels": -100}  # what pads each (B, N) key beyond the tokens: "not a target" for token labels, 0 for masks


def pad_batch_to(batch: dict, length: int, pad_id: int) -> dict:
    """Right-pad every (B, N) tensor of a batch to (B, length): ``input_ids`` with ``pad_id``, token ``labels``
    with -100, masks, token types and position ids with 0; other tensors (``labels`` (B,), ``example_mask``)
    as they are. A batch already ``length`` wide comes back unchanged. Padding is masked in every loss and
    in attention, so the values stay (the global-batch FCD relation needs one N on every rank)."""
    n = batch["input_ids"].shape[1]
    if length <= n:
        return batch
    values = {"input_ids": pad_id, **PAD_VALUES}
    return {k: torch.nn.functional.pad(v, (0, length - n), value=values.get(k, 0)) if v.dim() == 2 and v.shape[1] == n else v
            for k, v in batch.items()}  # (B, N) -> (B, length)


def position_ids_from_starts(starts: list, length: int) -> torch.Tensor:
    """Position ids that restart at 0 at every document start: (B, length) long.

    With them and no attention mask, transformers' masks (``masking_utils.find_packed_sequence_indices``
    for eager and sdpa, varlen kernels for flash_attention_2) attend only within each document, as
    ``DataCollatorWithFlattening`` sets them up.
    """
    pos = torch.empty((len(starts), length), dtype=torch.long)
    for i, doc_starts in enumerate(starts):
        bounds = [0, *[int(s) for s in doc_starts], length]
        for a, b in zip(bounds[:-1], bounds[1:]):
            pos[i, a:b] = torch.arange(b - a)
    return pos
