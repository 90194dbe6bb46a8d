"""Work in (command-line images, CSV / JSONL / Parquet rows with identities and error rows) and results
out (sinks: resumable parted files, and the progress line)."""

from .inputs import InputRow, Selection, count_images, expand_images, file_format, read_rows, read_work
from .outputs import COLUMN_NAMES, OUTPUT_COLUMNS, OutputError, PartedOutput, read_committed, result_rows
from .progress import Progress

__all__ = ["COLUMN_NAMES", "InputRow", "OUTPUT_COLUMNS", "OutputError", "PartedOutput", "Progress", "Selection",
           "count_images", "expand_images", "file_format", "read_committed", "read_rows", "read_work", "result_rows"]
