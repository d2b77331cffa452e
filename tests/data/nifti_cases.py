"""Tiny BraTS-layout NIfTI cases written with nibabel, shared by tests/data/test_nifti.py and
tests/data/test_patches.py.

Each case is `12 x 10 x 8` voxels in nibabel's `[X, Y, Z]` order (`[D, H, W] = [8, 10, 12]`
once loaded). Its modality `m` is `N(100 (m+1), 10 (m+1))` inside a box "brain" and 0 outside,
plus one voxel outside the box where only t2 is non-zero (the mask is *any* modality
non-zero). The BraTS label map puts 2 (oedema, large), 1 (core, medium) and 4 (enhancing,
small) blocks inside the brain; case `c` holds only oedema.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

SHAPE_XYZ = (12, 10, 8)
MODALITIES = ("flair", "t1", "t1ce", "t2")
CASES = ("case_a", "case_b", "case_c")
LONE_T2_XYZ = (0, 0, 0)  # outside the box: only t2 is non-zero there


def brain_box_xyz() -> np.ndarray:
    box = np.zeros(SHAPE_XYZ, bool)
    box[2:10, 1:9, 1:7] = True
    return box


def labels_xyz(case: str) -> np.ndarray:
    """BraTS label values of a case, `[X, Y, Z]`."""
    seg = np.zeros(SHAPE_XYZ, np.uint8)
    seg[3:9, 2:8, 2:6] = 2  # oedema: the large class
    if case != "case_c":
        seg[4:7, 3:6, 3:5] = 1  # core
        seg[5:6, 4:5, 3:4] = 4  # enhancing: one voxel
    return seg


def write_volume(path, data_xyz: np.ndarray, affine=None) -> str:
    nib.save(nib.Nifti1Image(data_xyz, np.eye(4) if affine is None else affine), str(path))
    return str(path)


def write_with_sform(path, data_xyz: np.ndarray, rows: np.ndarray) -> str:
    """Write a volume whose header's sform (code 1, no qform) holds `rows [3, 4]` as they are
    (`nib.Nifti1Image(data, affine)` would refuse or repair a bad affine)."""
    header = nib.Nifti1Header()
    header.set_data_shape(data_xyz.shape)
    header.set_data_dtype(data_xyz.dtype)
    header["sform_code"], header["qform_code"] = 1, 0
    header["srow_x"], header["srow_y"], header["srow_z"] = rows
    nib.save(nib.Nifti1Image(data_xyz, None, header=header), str(path))
    return str(path)


def write_cases(root, rng, cases=CASES, ext=".nii.gz") -> dict:
    """Write the cases under `root` (created); `{case: {"flair": data_xyz, ..., "seg": ...}}`."""
    os.makedirs(root, exist_ok=True)
    written = {}
    box = brain_box_xyz()
    for case in cases:
        folder = os.path.join(root, case)
        os.makedirs(folder, exist_ok=True)
        arrays = {}
        for m, name in enumerate(MODALITIES):
            data = np.where(box, rng.normal(100.0 * (m + 1), 10.0 * (m + 1), SHAPE_XYZ), 0.0)
            if name == "t2":
                data[LONE_T2_XYZ] = 7.0
            arrays[name] = data.astype(np.float32)
        arrays["seg"] = labels_xyz(case)
        for name, data in arrays.items():
            write_volume(os.path.join(folder, f"{case}_{name}{ext}"), data)
        written[case] = arrays
    return written


def zscore_in_brain(data_xyz: np.ndarray, brain_xyz: np.ndarray) -> np.ndarray:
    """The expected normalisation, written independently of the library (float64)."""
    values = data_xyz[brain_xyz].astype(np.float64)
    out = np.zeros(data_xyz.shape)
    out[brain_xyz] = (values - values.mean()) / values.std()
    return out


def to_dhw(data_xyz: np.ndarray) -> np.ndarray:
    """`[X, Y, Z]` -> `[Z, Y, X]` = `[D, H, W]` by explicit index arithmetic."""
    x, y, z = data_xyz.shape
    out = np.empty((z, y, x), data_xyz.dtype)
    for d in range(z):
        for h in range(y):
            out[d, h, :] = data_xyz[:, h, d]
    return out
