"""A text task's data as the plan checked it, in one of three ways: raw data tokenised by the run, a
prepared folder (made first when missing), or a stream. :class:`TextCorpus` checks at plan time (no
tokenising) and loads at set-up."""

from __future__ import annotations

from .documents import document_markers, read_chat_template
from .prepared import check_prepared, load_prepared, prepared_inputs, prepared_settings, read_prepared_metadata, write_prepared
from .streaming import StreamEpochs
from .text import block_frame, load_text_blocks, text_data_spec

__all__ = ["TextCorpus"]


class TextCorpus:
    """The data of a causal or masked LM run.

    Args:
        tokenizer: the teacher's tokenizer. data_args: :class:`~fcd_ds.config.DataArguments`.
        task: ``"causal_lm"`` or ``"masked_lm"``.

    Attributes:
        data: the raw data's :class:`~fcd_ds.data.text.TextData`, or None when a prepared folder is
            used without naming its raw data.
        prepared: ``--dataset_prepared_path``'s metadata record when the folder exists, else None.

    Raises:
        UsageError: at construction, every problem the plan can see (files, columns, row form, chat
            template, a prepared folder made otherwise).
    """

    def __init__(self, tokenizer, data_args, task: str):
        self.tokenizer, self.args, self.task = tokenizer, data_args, task
        path = data_args.dataset_prepared_path
        self.prepared = read_prepared_metadata(path) if path else None
        raw_given = data_args.train_file is not None or data_args.dataset_name is not None
        self.data = text_data_spec(tokenizer, data_args, task) if raw_given or self.prepared is None else None
        if self.prepared is not None:
            check_prepared(self.prepared, self._settings(), path, prepared_inputs(self.data, data_args) if self.data else None)

    def _settings(self) -> dict:
        """What a prepared folder must share with this run: all of the document spec when the run names its
        raw data, else what the flags alone decide (BOS/EOS, assistant-only loss, a given chat template)."""
        if self.data is not None:
            return prepared_settings(self.tokenizer, self.args, self.task, self.data.spec.as_record())
        bos, eos = document_markers(self.tokenizer, self.task, self.args.packing)
        document = {"bos": list(bos), "eos": list(eos), "assistant_only_loss": self.args.assistant_only_loss}
        if self.args.chat_template_path is not None:
            document["chat_template"] = read_chat_template(self.args.chat_template_path)
        return prepared_settings(self.tokenizer, self.args, self.task, document)

    def load(self, rank: int = 0, world: int = 1, seed: int = 0):
        """``(train, validation)``: map-style block datasets, or for ``--streaming`` a
        :class:`~fcd_ds.data.streaming.StreamEpochs` and the first ``max_eval_samples`` held-out blocks.
        Collective only through the caller's ``main_process_first``."""
        a = self.args
        if a.dataset_prepared_path is not None:
            if read_prepared_metadata(a.dataset_prepared_path) is None:
                write_prepared(a.dataset_prepared_path, self.tokenizer, a, self.data, a.preprocessing_num_workers)
            return load_prepared(a.dataset_prepared_path, self._settings(), None)
        frame = block_frame(self.tokenizer, self.task)
        if a.streaming:
            train = StreamEpochs(self.data.train, a, self.tokenizer, self.data.spec, frame, rank, world, seed)
            held_out = StreamEpochs(self.data.validation, a, self.tokenizer, self.data.spec, frame, 0, 1, seed)
            return train, held_out.first_blocks(a.max_eval_samples)
        return load_text_blocks(self.tokenizer, a, self.data, a.preprocessing_num_workers)
