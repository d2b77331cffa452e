"""Reading the files of NIfTI cases with nibabel (`tfp_seg.data.load_nifti`): the case
folders of a source, their headers checked, and one case decoded into arrays `[D, H, W, ...]`
(nibabel's `[X, Y, Z]` transposed), with its brain mask and normalisation. Every problem is
one `ValueError` naming the case folder and the file (see `tfp_seg.data.nifti`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "EXTENSIONS",
    "CaseFiles",
    "check_headers",
    "decode_case",
    "map_labels",
    "normalize_in_mask",
    "plan_cases",
]

EXTENSIONS = (".nii.gz", ".nii")
_LAYOUT = "DIR/<case>/<case>_<modality>.nii.gz (or .nii) and DIR/<case>/<case>_<label>.nii.gz"


def _nibabel():
    try:
        import nibabel
    except ImportError as exc:  # pragma: no cover - nibabel is a dependency
        raise ImportError("reading NIfTI volumes needs nibabel: pip install nibabel") from exc
    return nibabel


# ================================================================================================
# Layout and headers
# ================================================================================================


@dataclasses.dataclass(frozen=True)
class CaseFiles:
    """The files of one case: its id (the folder name), folder, the modality files in channel
    order and the label file (None: none, allowed with `require_labels=False`)."""

    case_id: str
    folder: str
    modalities: tuple  # paths, in channel order
    label: Optional[str]

    def files(self) -> list:
        return list(self.modalities) + ([self.label] if self.label else [])


def _case_error(case: CaseFiles, path: Optional[str], why: str) -> ValueError:
    where = f"case folder {case.folder!r}"
    if path is not None:
        where += f", file {os.path.basename(path)!r}"
    return ValueError(f"{where}: {why}")


def _find_file(folder: str, case_id: str, suffix: str) -> list:
    names = [f"{case_id}_{suffix}{ext}" for ext in EXTENSIONS]
    return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


def plan_cases(
    directory: str, modalities: Sequence[str], label_suffix: str, require_labels: bool
) -> list:
    """The `CaseFiles` of every case folder of `directory` (sorted by name): missing or
    doubled (`.nii` and `.nii.gz`) files are a `ValueError` naming the case folder and file."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"nifti folder {directory!r} does not exist or is not a folder.")
    with os.scandir(directory) as entries:
        names = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise ValueError(f"nifti folder {directory!r} holds no case folders; expected {_LAYOUT}.")
    cases = []
    for case_id in names:
        folder = os.path.join(directory, case_id)
        found = {}
        for suffix in (*modalities, label_suffix):
            paths = _find_file(folder, case_id, suffix)
            case = CaseFiles(case_id, folder, (), None)
            if len(paths) > 1:
                raise _case_error(case, paths[0], f"both {paths[0]!r} and {paths[1]!r}; keep one.")
            missing = not paths and (suffix != label_suffix or require_labels)
            if missing:
                what = "label" if suffix == label_suffix else f"modality {suffix!r}"
                raise _case_error(
                    case,
                    f"{case_id}_{suffix}.nii.gz",
                    f"the {what} file is missing (expected {case_id}_{suffix}.nii.gz or .nii"
                    + (
                        "; pass require_labels=False for cases without labels)."
                        if suffix == label_suffix
                        else ")."
                    ),
                )
            found[suffix] = paths[0] if paths else None
        cases.append(
            CaseFiles(case_id, folder, tuple(found[m] for m in modalities), found[label_suffix])
        )
    return cases


def _open(case: CaseFiles, path: str):
    """The nibabel image of `path` (header read, data not yet), checked: 3-D data and a
    finite, invertible 4x4 affine."""
    nib = _nibabel()
    try:
        image = nib.load(path)
        shape, affine = tuple(image.shape), image.affine
    except Exception as exc:  # nibabel raises many types for unreadable files
        why = f"nibabel cannot read it ({type(exc).__name__}: {exc})."
        raise _case_error(case, path, why) from exc
    if len(shape) != 3:
        raise _case_error(
            case, path, f"the data are {len(shape)}-D, shape {shape}; expected a 3-D volume."
        )
    affine = None if affine is None else np.asarray(affine, np.float64)
    if (
        affine is None
        or affine.shape != (4, 4)
        or not np.all(np.isfinite(affine))
        or not np.allclose(affine[3], [0, 0, 0, 1])
        or abs(np.linalg.det(affine[:3, :3])) < 1e-12
    ):
        got = None if affine is None else affine.tolist()
        raise _case_error(
            case, path, f"the affine is not a finite, invertible 4x4 matrix; got {got}."
        )
    return image


def check_headers(case: CaseFiles) -> tuple:
    """The case's shape `(X, Y, Z)` from the headers; shapes that differ are an error."""
    shape = None
    for path in case.files():
        got = tuple(_open(case, path).shape)
        if shape is None:
            shape, first = got, path
        elif got != shape:
            what = "the label map's shape" if path == case.label else "its shape"
            raise _case_error(
                case,
                path,
                f"{what} {got} differs from the shape {shape} of {os.path.basename(first)!r} "
                "(all modalities and the label map must share one voxel grid).",
            )
    return shape


# ================================================================================================
# Decoding one case
# ================================================================================================


def normalize_in_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-channel z-scores inside a mask: float32 `[*S, M]` of `image [*S, M]` and a boolean
    `mask [*S]`, `(x - mean_m) / std_m` with the mean and population std of channel `m` over
    the masked voxels (computed in float64), and 0 outside the mask. A channel constant inside
    the mask (std 0) becomes 0 there."""
    image = np.asarray(image)
    mask = np.asarray(mask, bool)
    if image.ndim < 2 or mask.shape != image.shape[:-1]:
        raise ValueError(
            f"`mask` must have the shape of `image` [*S, M] without M; got image {image.shape} "
            f"and mask {mask.shape}."
        )
    out = np.zeros(image.shape, np.float32)
    for m in range(image.shape[-1]):
        values = image[..., m][mask].astype(np.float64)
        if not values.size:
            continue
        mean, std = values.mean(), values.std()
        out[..., m][mask] = (values - mean) / std if std > 0 else 0.0
    return out


def map_labels(values: np.ndarray, label_map: Mapping[int, int], case, path) -> np.ndarray:
    """uint8 classes of the label values through `label_map`; non-integer or unmapped values
    are an error naming the case, the file and the values."""
    if np.issubdtype(values.dtype, np.floating):
        if not np.all(np.isfinite(values)):
            raise _case_error(case, path, "the label map holds NaN or infinite voxels.")
        if not np.array_equal(values, np.round(values)):
            raise _case_error(case, path, "the label map holds non-integer values.")
    present = np.unique(values).astype(np.int64)
    keys = np.array(sorted(label_map), np.int64)
    unmapped = [int(v) for v in present if v not in label_map]
    if unmapped:
        raise _case_error(
            case,
            path,
            f"the label map holds values {unmapped} that `label_map` {dict(label_map)} does not "
            "map to a class.",
        )
    classes = np.array([label_map[int(k)] for k in keys], np.uint8)
    return classes[np.searchsorted(keys, values.astype(np.int64))]


def _read_data(case: CaseFiles, path: str) -> np.ndarray:
    """A file's voxels `[D, H, W]` (transposed from nibabel's `[X, Y, Z]`), float32 for
    modalities and the stored values for the label map; NaN / inf are an error."""
    image = _open(case, path)
    try:
        if path == case.label:
            data = np.asanyarray(image.dataobj)
        else:
            data = image.get_fdata(dtype=np.float32)
    except Exception as exc:
        why = f"nibabel cannot read its data ({type(exc).__name__}: {exc})."
        raise _case_error(case, path, why) from exc
    if path != case.label and not np.all(np.isfinite(data)):
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        raise _case_error(case, path, f"{bad} voxels are NaN or infinite.")
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0)))


def decode_case(case: CaseFiles, label_map: Mapping[int, int], normalize: bool) -> dict:
    """The arrays of one case: `image` float32 `[D, H, W, M]`, `brain` bool `[D, H, W]`,
    `label` uint8 `[D, H, W]` (absent without a label file)."""
    check_headers(case)
    first = _read_data(case, case.modalities[0])
    image = np.empty(first.shape + (len(case.modalities),), np.float32)
    image[..., 0] = first
    del first
    for m, path in enumerate(case.modalities[1:], start=1):
        image[..., m] = _read_data(case, path)
    brain = np.any(image != 0, axis=-1)
    if not brain.any():
        raise _case_error(case, None, "no voxel of any modality is non-zero (empty brain mask).")
    if normalize:
        image = normalize_in_mask(image, brain)
    arrays = {"image": image, "brain": brain}
    if case.label is not None:
        arrays["label"] = map_labels(_read_data(case, case.label), label_map, case, case.label)
    return arrays
