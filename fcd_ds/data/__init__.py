"""Data: every format users hold -> documents -> packed blocks -> resumable micro-batches (README "Data").

* :mod:`~fcd_ds.data.sources`: files, globs, save_to_disk folders and hub datasets -> ``datasets`` splits;
* :mod:`~fcd_ds.data.documents`: rows (text, chat ``messages``, ``prompt``/``completion``) -> documents;
* :mod:`~fcd_ds.data.blocks`: documents -> packed blocks or padded sequences;
* :mod:`~fcd_ds.data.text`: the text tasks' pipeline; :mod:`~fcd_ds.data.corpus`: raw, prepared or streamed;
* :mod:`~fcd_ds.data.prepared` and :mod:`~fcd_ds.data.prepare` (``fcd-ds-prepare-data``): prepare once;
* :mod:`~fcd_ds.data.streaming`: corpora larger than memory;
* :mod:`~fcd_ds.data.loader`: rank-sharded, resumable micro-batches with DataLoader workers.
"""

from .blocks import pad_batch_to, pad_rows, position_ids_from_starts, special_token_frame
from .corpus import TextCorpus
from .documents import DocumentSpec, document_markers
from .loader import MicroBatches, eval_batches, make_micro_batches
from .sources import DataSource, load_split, resolve_source
from .streaming import StreamEpochs, StreamingMicroBatches

__all__ = [
    "DataSource",
    "DocumentSpec",
    "MicroBatches",
    "StreamEpochs",
    "StreamingMicroBatches",
    "TextCorpus",
    "document_markers",
    "eval_batches",
    "load_split",
    "make_micro_batches",
    "pad_batch_to",
    "pad_rows",
    "position_ids_from_starts",
    "resolve_source",
    "special_token_frame",
]
