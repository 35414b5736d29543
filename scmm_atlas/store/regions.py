"""Genomic regions named by their coordinates: the ATAC feature names a store keeps.

Peak callers and converters spell a region ``chr1:100-200``, ``chr1-100-200`` or ``chr1_100_200``
(0-based start, exclusive end, as in BED). Gene activity and motif annotation both need the
coordinates back, so they are parsed in one place, with an error naming the first bad name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..errors import InputError

_REGION = re.compile(r"^(?P<chrom>.+?)[:_-](?P<start>\d+)[-_](?P<end>\d+)$")


def parse_regions(names: Sequence[str], *, where: str = "features", field: str = "var_id") -> pd.DataFrame:
    """``chrom``, ``start``, ``end`` (int64) of each region name, in order; an :class:`InputError`
    naming ``where`` and ``field`` for the first name that is not ``CHROM:START-END`` (or ``-``/``_``
    separated) or whose end is not after its start."""
    chroms, starts, ends = [], np.empty(len(names), dtype=np.int64), np.empty(len(names), dtype=np.int64)
    for i, name in enumerate(names):
        m = _REGION.match(str(name))
        if m is None or int(m["end"]) <= int(m["start"]):
            raise InputError(where, field, f"{name!r} is not a genomic region CHROM:START-END with END > START "
                             "(ATAC features must be named by their coordinates)")
        chroms.append(m["chrom"])
        starts[i], ends[i] = int(m["start"]), int(m["end"])
    return pd.DataFrame({"chrom": pd.Series(chroms, dtype=object), "start": starts, "end": ends})
