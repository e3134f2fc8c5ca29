"""An independent reading of a DICOM SEG for the tests: highdicom's own segment numbers, mapped to
volume labels by the list ``write_dicom_seg`` returned, without the name and code matching of
:func:`dafne_logic.core.dicom_seg.read_dicom_seg` (which the writer's tests must not rely on)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np


def segment_numbers_as_labels(path: Path | str, source_sop_instance_uids: Sequence[str],
                              values: Sequence[int]) -> np.ndarray:
    """The SEG's masks as volume labels (k, j, i) on its source images, in the order given: segment n
    becomes ``values[n - 1]``; source images without a frame come back empty (0)."""
    seg = hd.seg.segread(str(path))
    numbers = seg.get_pixels_by_source_instance(source_sop_instance_uids=list(source_sop_instance_uids),
                                                combine_segments=True, relabel=False)
    lookup = np.concatenate([[0], np.asarray(values, np.int64)])
    return lookup[numbers]
