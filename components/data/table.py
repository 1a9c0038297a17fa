"""The canonical image table: column names, Arrow schema, Parquet read/write.

One row per image. ``ingest`` writes the canonical columns; ``degrade`` adds
``role`` and ``scale``; ``split`` adds ``split`` and ``repeat``. Every later
stage reads these names from here.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from components.fsutil import atomic_path

# canonical columns (ingest)
IMAGE_ID = "image_id"        # string, unique within the table
PERSON_ID = "person_id"      # int64, unique over the dataset; >= 1, except 0 = distractor (Market-1501)
CAMERA_ID = "camera_id"      # int32, 1-based as in the datasets' file names
SOURCE_PATH = "source_path"  # string, relative to data/raw
SOURCE_SPLIT = "source_split"  # string: the layout's own division (train/query/gallery) or ""
HEIGHT = "height"            # int32, of the stored image
WIDTH = "width"              # int32, of the stored image
IMAGE = "image"              # binary, PNG bytes
# added by degrade
ROLE = "role"                # string: "hr" or "lr"
SCALE = "scale"              # float64: down-sampling factor (1.0 for HR)
SOURCE_IMAGE_ID = "source_image_id"  # string: the canonical image this row was made from
# added by split
SPLIT = "split"              # string: "train", "query" or "gallery"
REPEAT = "repeat"            # int32: gallery draw 0..9; -1 on train/query rows (in every repeat)

CANONICAL_SCHEMA = pa.schema(
    [
        (IMAGE_ID, pa.string()),
        (PERSON_ID, pa.int64()),
        (CAMERA_ID, pa.int32()),
        (SOURCE_PATH, pa.string()),
        (SOURCE_SPLIT, pa.string()),
        (HEIGHT, pa.int32()),
        (WIDTH, pa.int32()),
        (IMAGE, pa.binary()),
    ]
)
DEGRADED_SCHEMA = CANONICAL_SCHEMA.append(pa.field(ROLE, pa.string())).append(
    pa.field(SCALE, pa.float64())
).append(pa.field(SOURCE_IMAGE_ID, pa.string()))
SPLIT_SCHEMA = DEGRADED_SCHEMA.append(pa.field(SPLIT, pa.string())).append(
    pa.field(REPEAT, pa.int32())
)

PAIRS_SCHEMA = pa.schema(
    [("lr_image_id", pa.string()), ("hr_image_id", pa.string()), (PERSON_ID, pa.int64())]
)


class TableError(ValueError):
    """A table that is missing, unreadable or lacks the columns a stage needs."""


def write_table(table: pa.Table, path: str | Path, schema: pa.Schema | None = None) -> None:
    """Write ``table`` to Parquet atomically, cast to ``schema`` when given."""
    if schema is not None:
        table = table.select(schema.names).cast(schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=2048)


def read_table(path: str | Path, schema: pa.Schema | None = None, columns=None) -> pa.Table:
    """Read a Parquet table; with ``schema``, check that its columns are all there."""
    path = Path(path)
    if not path.exists():
        raise TableError(f"{path}: missing; run the stage that writes it (`dvc repro`)")
    try:
        table = pq.read_table(path, columns=columns)
    except Exception as exc:  # pyarrow raises many types for corrupt files
        raise TableError(f"{path}: not a readable Parquet table ({exc})") from None
    if schema is not None:
        missing = [n for n in schema.names if n not in table.column_names and (columns is None or n in columns)]
        if missing:
            raise TableError(
                f"{path}: missing columns {missing}; it was written by an older stage, "
                "re-run `dvc repro`"
            )
    return table
