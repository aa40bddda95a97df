"""``fcd-ds-prepare-data`` (or ``python -m fcd_ds.data.prepare``): tokenise and pack a corpus once into
a folder that every later run opens memory-mapped in seconds (``--dataset_prepared_path DIR``).

    fcd-ds-prepare-data --dataset_prepared_path data/corpus-2048 --train_file 'corpus/*.parquet' \\
        --validation_file valid.jsonl --tokenizer_name /models/teacher --max_seq_length 2048 --num_proc 16

The data flags are the launchers' (``--train_file``, ``--dataset_name``, ``--text_column``,
``--packing``, ``--assistant_only_loss``, ``--chat_template_path``, ...; ``--help`` lists them) and mean
the same; the folder records them with the tokenizer and refuses a run that differs
(:mod:`fcd_ds.data.prepared`). Without data flags it prepares the launchers' default corpus, with the
default teacher's tokenizer.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

from ..errors import UsageError

__all__ = ["PrepareArguments", "prepare", "main"]


@dataclass
class PrepareArguments:
    """What only the preparing step needs."""

    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer folder or hub name (the teacher's). Default: the default teacher of --task (SmolLM2-135M for causal_lm, all-MiniLM-L6-v2 for masked_lm)."})
    num_proc: int | None = field(default=None, metadata={"help": "Tokenising processes (datasets' map num_proc); the same as --preprocessing_num_workers."})


def prepare(data_args, prepare_args) -> dict:
    """Prepare ``data_args.dataset_prepared_path`` and return its metadata record (already prepared with
    the same settings and inputs: the existing record).

    Raises:
        UsageError: no ``--dataset_prepared_path``, classification, streaming, bad data or tokenizer, or a
            folder there made otherwise.
    """
    from ..assets import prepare_default_assets, prepare_encoder_assets
    from ..defaults import fill_default_text_data
    from ..models import load_tokenizer
    from .corpus import TextCorpus
    from .prepared import write_prepared

    if data_args.dataset_prepared_path is None:
        raise UsageError("--dataset_prepared_path: say where to write the prepared folder")
    if data_args.task == "sequence_classification" or data_args.streaming:
        raise UsageError("--task: fcd-ds-prepare-data prepares text tasks (causal_lm, masked_lm) without --streaming")
    if prepare_args.num_proc is not None:
        if prepare_args.num_proc < 1:
            raise UsageError(f"--num_proc: must be > 0, got {prepare_args.num_proc}")
        data_args.preprocessing_num_workers = prepare_args.num_proc
    name = prepare_args.tokenizer_name
    if name is None:
        name = str(prepare_default_assets().teacher if data_args.task == "causal_lm" else prepare_encoder_assets().minilm)
    tokenizer = load_tokenizer(name, "--tokenizer_name")
    target, data_args.dataset_prepared_path = data_args.dataset_prepared_path, None  # check the raw data as a run would
    fill_default_text_data(data_args, documents=data_args.task == "causal_lm")  # the launchers' default corpus
    corpus = TextCorpus(tokenizer, data_args, data_args.task)
    data_args.dataset_prepared_path = target
    return write_prepared(target, tokenizer, data_args, corpus.data, data_args.preprocessing_num_workers)


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, prepare, print the folder's record as JSON; ``error: <one line>`` and exit 2 on bad input."""
    from transformers import HfArgumentParser

    from ..config import DataArguments, unknown_flags_message

    parser = HfArgumentParser((DataArguments, PrepareArguments), description=__doc__.split("\n\n")[0], allow_abbrev=False)
    try:
        data_args, prepare_args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        if unknown:
            raise UsageError(unknown_flags_message(parser, unknown))
        start = time.perf_counter()
        record = prepare(data_args, prepare_args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps({"dataset_prepared_path": data_args.dataset_prepared_path, "seconds": round(time.perf_counter() - start, 2),
                      **{k: record[k] for k in ("blocks", "tokens", "num_proc")}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
