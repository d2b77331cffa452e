"""Loaders for local copies of multi-annotator segmentation data (nothing is downloaded).

* `load_lidc_crops(path)`: the LIDC-IDRI 128x128 lesion crops with 4 rater masks each, as the
  pickle distributed with the PyTorch reimplementation of the Probabilistic U-Net
  (`data_lidc.pickle`, https://github.com/stefanknegt/Probabilistic-Unet-Pytorch): a dict
  `{image_id: {"image": float [128, 128] in [0, 1], "masks": [4 x uint8 [128, 128]],
  "series_uid": str}}`, possibly split over several `.pickle` files in one folder.
* `load_image_folder(images_dir, masks_dir)`: any folder of images with one or several masks
  per image (`masks_dir/<stem>_<k>.png`, `masks_dir/<stem>/<k>.png` or `masks_dir/<stem>.png`),
  read with Pillow.

Both return `AnnotatedImages`: `images [N, H, W, channels]` float32, `annotations [N, K, H, W]`
(uint8 class ids), with `to_dataset(...)` like `tfp_seg.data.AmbiguousShapes.to_dataset`, and
`split` / `train_val_test` that keep all crops of one patient series (`groups`) in one part.
"""

from tfp_seg.data.annotated_images import AnnotatedImages
from tfp_seg.data.image_folder import IMAGE_EXTENSIONS, load_image_folder
from tfp_seg.data.lidc import load_lidc_crops

__all__ = ["AnnotatedImages", "load_image_folder", "load_lidc_crops", "IMAGE_EXTENSIONS"]
