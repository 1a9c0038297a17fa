"""Shared fixtures: small canonical tables built in memory (no files, no downloads)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from components import images
from components.data import table as T


def make_canonical(n_ids=6, cams=(1, 2), per_cam=3, size=(32, 16), seed=0, source_split=None) -> pa.Table:
    """A canonical table of random-noise images: n_ids identities x cams x per_cam."""
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in T.CANONICAL_SCHEMA.names}
    for pid in range(1, n_ids + 1):
        for cam in cams:
            for k in range(per_cam):
                x = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                image_id = f"{pid:04d}_c{cam}_{k:02d}"
                rows[T.IMAGE_ID].append(image_id)
                rows[T.PERSON_ID].append(pid)
                rows[T.CAMERA_ID].append(cam)
                rows[T.SOURCE_PATH].append(image_id + ".png")
                rows[T.SOURCE_SPLIT].append(source_split(pid, cam, k) if source_split else "")
                rows[T.HEIGHT].append(size[0])
                rows[T.WIDTH].append(size[1])
                rows[T.IMAGE].append(images.encode_png(x))
    return pa.table(rows, schema=T.CANONICAL_SCHEMA)


@pytest.fixture
def canonical() -> pa.Table:
    return make_canonical()
