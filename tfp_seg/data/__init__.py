"""Synthetic data with an exactly known label distribution, loaders of local copies of real
multi-annotator data (no downloads), and data sources by name (`load(spec)`), in memory or
streamed from a disk cache (`DiskAnnotatedImages`)."""

from tfp_seg.data.ambiguous_shapes import (
    AmbiguousShapes,
    ShapeObject,
    ambiguous_shapes,
    sample_annotations,
)
from tfp_seg.data.disk import DiskAnnotatedImages, MappedArray
from tfp_seg.data.loaders import AnnotatedImages, load_image_folder, load_lidc_crops
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
    "SOURCE_KINDS",
    "SPLIT_PARTS",
    "AmbiguousShapes",
    "AnnotatedImages",
    "DataSpec",
    "DiskAnnotatedImages",
    "MappedArray",
    "ShapeObject",
    "ambiguous_shapes",
    "load",
    "load_image_folder",
    "load_lidc_crops",
    "parse_spec",
    "sample_annotations",
    "select_split",
    "split_data",
    "split_record",
]
