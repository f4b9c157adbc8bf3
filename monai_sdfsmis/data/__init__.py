"""Data of monai_sdfsmis: dataset layouts, volume loading, supervoxels, training episodes and the evaluation protocol."""

from __future__ import annotations

from .episodes import (
    ALPNET_LABEL_GROUPS,
    EpisodeDataset,
    EpisodeSampler,
    slice_label_counts,
    slices_to_exclude,
    supervoxel_slice_counts,
)
from .labelled_slices import LabelledSliceDataset
from .layouts import NIFTI_SUFFIXES, VolumeRecord, find_alpnet_volumes, load_datalist, read_datalist
from .phantoms import PHANTOM_ORGANS, make_phantom_dataset, phantom_volume
from .protocol import (
    CHAOS_ORGANS,
    SABS_ORGANS,
    ProtocolCase,
    chunk_bounds,
    fold_split,
    k_shot_supports,
    organ_slices,
    protocol_cases,
    rpt_folds,
    support_and_queries,
    support_slice_indices,
)
from .slices import SliceDataset, holdout_slices, split_holdout
from .supervoxels import compute_supervoxels, felzenszwalb_3d, foreground_mask, write_supervoxels
from .volumes import VolumeStore
