"""Dictionary transforms of monai_sdfsmis: loading, intensity scaling/resizing and RPT augmentation."""

from __future__ import annotations

from .augmentation import (
    RandRPTAffined,
    RandRPTAffineD,
    RandRPTAffineDict,
    RandRPTElasticd,
    RandRPTElasticD,
    RandRPTElasticDict,
    RPTAugmentd,
    RPTAugmentD,
    RPTAugmentDict,
    rpt_affine_matrix,
    rpt_elastic_displacement,
)
from .intensity import (
    PRESETS,
    ReplicateChanneld,
    ReplicateChannelD,
    ReplicateChannelDict,
    ResizeSlicesd,
    ResizeSlicesD,
    ResizeSlicesDict,
    ScaleToUnitRange,
    ScaleToUnitRanged,
    ScaleToUnitRangeD,
    ScaleToUnitRangeDict,
)
from .io import (
    NIFTI_SUFFIXES,
    NRRD_SUFFIXES,
    CheckLabelIdsd,
    CheckLabelIdsD,
    CheckLabelIdsDict,
    LoadVolumed,
    LoadVolumeD,
    LoadVolumeDict,
    SaveVolumed,
    check_label_ids,
    check_output_folder,
    check_same_grid,
    load_volume,
    select_reader,
)
from .postprocess import POSTPROCESS_STEPS, OrganMaskPostprocess, SplitProbabilityd, check_postprocess_steps
