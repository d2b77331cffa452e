"""Optional libraries (keras-hub, keras-cv) and their presets: clear errors when offline.

#### Presets and offline use

Presets (`"deeplab_v3_plus_resnet50_pascalvoc"`, `"resnet_18_imagenet"`, ...) are downloaded by
keras-hub on first use. Without network this fails with `PresetUnavailableError`, which names
the preset and the alternatives: build from config (`build_backbone(...)`), pass a local preset
folder (written by `backbone.save_to_preset(folder)` on a machine with network), or load a
`.weights.h5` file (`backbone.save_weights(path)`) with `build_backbone(..., weights=path)`.
"""

from __future__ import annotations

import keras

__all__ = ["PresetUnavailableError"]


class PresetUnavailableError(RuntimeError):
    """A keras-hub / keras-cv preset could not be fetched (typically: no network)."""


def import_keras_hub():
    try:
        import keras_hub
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "keras-hub backbones need the optional `keras-hub` package: "
            "pip install 'tfp_seg[keras-hub]' (keras-hub 0.29.1 to 0.32)."
        ) from e
    return keras_hub


def import_keras_cv():
    try:
        import keras_cv
    except Exception as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "keras-cv backbones need the optional legacy `keras-cv` package, which must import "
            f"with Keras {keras.__version__}: pip install 'tfp_seg[keras-cv]' (keras-cv==0.9.0). "
            f"Importing it failed with {type(e).__name__}: {e}. keras-hub is the maintained "
            "successor: use tfp_seg.models.from_keras_hub / build_backbone instead."
        ) from e
    return keras_cv


def offline_message(preset: str, library: str, error: Exception) -> str:
    return (
        f"Could not load the {library} preset {preset!r}: its config and weights must be "
        f"downloaded (Kaggle / Hugging Face) and that failed ({type(error).__name__}: "
        f"{str(error)[:300]}). Without network, either\n"
        "  1. build the backbone from config (random weights), e.g. "
        "tfp_seg.models.build_backbone('deeplabv3plus_resnet', size='full') or "
        "keras_hub.models.ResNetBackbone(...) passed to tfp_seg.models.from_keras_hub(backbone, "
        "head);\n"
        f"  2. use a local preset folder: on a machine with network run "
        f"`keras_hub.models.Backbone.from_preset({preset!r}).save_to_preset('/path/to/{preset}')`"
        f", copy the folder (config.json, model.weights.h5, metadata.json) here and pass "
        f"'/path/to/{preset}' instead of {preset!r}; or\n"
        "  3. load a local weights file: build from config with the preset's architecture and pass "
        "weights='/path/to/backbone.weights.h5' (written by `backbone.save_weights(...)`) to "
        "tfp_seg.models.build_backbone."
    )


def is_network_error(error: Exception) -> bool:
    if isinstance(error, (OSError, ConnectionError, TimeoutError)):
        return True
    module = type(error).__module__ or ""
    return module.split(".")[0] in ("requests", "urllib3", "kagglehub", "huggingface_hub")
