"""tfp_seg: probabilistic segmentation heads for Keras 3 and TensorFlow Probability.

Turns any segmentation backbone into a model that outputs a distribution over per-pixel
logits: low-rank multivariate normal logits (Stochastic Segmentation Networks), heteroscedastic
normal logits, and CVAE latents (Probabilistic U-Net), with their losses, uncertainty read-outs,
metrics and exporters.
"""

__version__ = "0.1.0"
"""The version of tfp_seg (PEP 440); `setup.cfg` reads it from here."""

import importlib  # noqa: E402

from tfp_seg import (  # noqa: E402
    calibration,
    data,
    distribute,
    distributions,
    export,
    layers,
    losses,
    metrics,
    models,
    plots,
    protocols,
    uncertainty,
)

__all__ = [
    "__version__",
    "calibration",
    "data",
    "distribute",
    "distributions",
    "export",
    "layers",
    "losses",
    "metrics",
    "models",
    "plots",
    "protocols",
    "reporting",
    "uncertainty",
]


def __getattr__(name):
    # `tfp_seg.reporting` belongs to the application (tfp_seg.runs), which the library does not
    # import: it is loaded on first use, so `import tfp_seg` stays free of the application.
    if name == "reporting":
        return importlib.import_module("tfp_seg.reporting")
    raise AttributeError(f"module 'tfp_seg' has no attribute {name!r}")
