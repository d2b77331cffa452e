"""Synthetic data with an exactly known label distribution, loaders of local copies of real
multi-annotator data (no downloads), and data sources by name (`load(spec)`), in memory or
streamed from a disk cache (`DiskAnnotatedImages`), and NIfTI volumes (`load_nifti`,
`NiftiVolumes`) with random patches through `tf.data` (`patch_dataset`)."""

from tfp_seg.data.ambiguous_shapes import (
    AmbiguousShapes,
    ShapeObject,
    ambiguous_shapes,
    sample_annotations,
)
from tfp_seg.data.disk import DiskAnnotatedImages, MappedArray
from tfp_seg.data.loaders import AnnotatedImages, load_image_folder, load_lidc_crops
from tfp_seg.data.nifti import (
    BRATS_CLASS_NAMES,
    BRATS_LABEL_MAP,
    BRATS_MODALITIES,
    NiftiCase,
    NiftiVolumes,
    load_nifti,
    normalize_in_mask,
)
from tfp_seg.data.patches import extract_patch, patch_centres, patch_dataset, read_patches
from tfp_seg.data.sources import (
    SOURCE_KINDS,
    SPLIT_PARTS,
    DataSpec,
    load,
    parse_spec,
    select_split,
    split_data,
    split_record,
)

__all__ = [
    "BRATS_CLASS_NAMES",
    "BRATS_LABEL_MAP",
    "BRATS_MODALITIES",
    "SOURCE_KINDS",
    "SPLIT_PARTS",
    "AmbiguousShapes",
    "AnnotatedImages",
    "DataSpec",
    "DiskAnnotatedImages",
    "MappedArray",
    "NiftiCase",
    "NiftiVolumes",
    "ShapeObject",
    "ambiguous_shapes",
    "extract_patch",
    "load",
    "load_image_folder",
    "load_lidc_crops",
    "load_nifti",
    "normalize_in_mask",
    "parse_spec",
    "patch_centres",
    "patch_dataset",
    "read_patches",
    "sample_annotations",
    "select_split",
    "split_data",
    "split_record",
]
