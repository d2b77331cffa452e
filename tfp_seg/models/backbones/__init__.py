"""keras-hub / keras-cv segmentation backbones with a tfp_seg distribution head.

`from_keras_hub(backbone_or_segmenter, head)` and `from_keras_cv(...)` return a
`ProbabilisticSegmenter` whose backbone is a `BackboneAdapter`: a serialisable functional Keras
model that wraps the hub model and returns features **at the input resolution**, so any
`DistributionHead` (deterministic, heteroscedastic, SSN) sits on top unchanged. These
backbones are 2D (images `[B, H, W, channels]`): a head or an input shape for volumes on them
is a `ValueError`; volumes take `tfp_seg.models.UNet(spatial_dims=3)`.
`build_backbone(name, num_channels=...)` builds the supported families from config (nothing is
downloaded) for the CLI and the benchmarks.

```none
module      holds
adapter     BackboneAdapter, PyramidEncoder, ResizeToReference, adapt: the shared machinery
            (and the resolution strategy: why features, not parameters, are upsampled)
keras_hub   from_keras_hub, the keras-hub families' configs
keras_cv    from_keras_cv, SegmenterFeatures (legacy keras-cv 0.9)
presets     PresetUnavailableError, optional imports, the offline message
catalog     BACKBONE_NAMES (the one list of named backbones), build_backbone
```
"""

from tfp_seg.models.backbones.adapter import BackboneAdapter, PyramidEncoder, ResizeToReference
from tfp_seg.models.backbones.adapter import adapt as adapt  # public, not in __all__ (as before)
from tfp_seg.models.backbones.adapter import detect_pyramid_layers as detect_pyramid_layers
from tfp_seg.models.backbones.catalog import BACKBONE_NAMES, build_backbone
from tfp_seg.models.backbones.keras_cv import SegmenterFeatures, from_keras_cv
from tfp_seg.models.backbones.keras_hub import from_keras_hub
from tfp_seg.models.backbones.presets import PresetUnavailableError

__all__ = [
    "BACKBONE_NAMES",
    "BackboneAdapter",
    "PresetUnavailableError",
    "PyramidEncoder",
    "ResizeToReference",
    "SegmenterFeatures",
    "build_backbone",
    "from_keras_cv",
    "from_keras_hub",
]
