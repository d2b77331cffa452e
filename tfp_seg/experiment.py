"""Earlier name of the application's run API, now in `tfp_seg.runs` (config, data, model,
train, evaluate): every name it had is re-exported here, so existing imports keep working.

```python
from tfp_seg.runs import TrainConfig, train, load_run    # the current names
from tfp_seg.experiment import TrainConfig, train        # still works
```

`HEADS` here keeps its earlier meaning, every value of `TrainConfig.head` (distribution heads
and sampling baselines alike); `tfp_seg.runs` splits it into `HEADS` (distribution heads) and
`BASELINES` (`mc_dropout`, `ensemble`), with `HEAD_CHOICES` for both.
"""

from __future__ import annotations

from typing import Any

from tfp_seg import _io
from tfp_seg.runs.config import (
    BACKBONES,
    BASELINES,  # noqa: F401  (re-exported)
    HEAD_CHOICES,
    MODELS,
    TrainConfig,
    load_config,
)
from tfp_seg.runs.data import make_data
from tfp_seg.runs.evaluate import load_run
from tfp_seg.runs.model import build_model, sampler_for
from tfp_seg.runs.train import (
    NonFiniteGuard,
    atomic_save_model,  # noqa: F401  (re-exported)
    save_model,
    train,
)

__all__ = [
    "TrainConfig",
    "HEADS",
    "BACKBONES",
    "MODELS",
    "build_model",
    "load_config",
    "make_data",
    "train",
    "atomic_write_json",
    "load_run",
    "save_model",
    "sampler_for",
]

# Every accepted `head` value, as before the split into distribution heads and baselines.
HEADS = HEAD_CHOICES


class _NonFiniteGuard:
    """The factory of earlier versions: `_NonFiniteGuard.make()` is a
    `tfp_seg.runs.train.NonFiniteGuard()`."""

    make = staticmethod(NonFiniteGuard)


def atomic_write_json(path: str, payload: Any) -> None:
    """Write JSON (indent 2, sorted keys) to `path` atomically: `tfp_seg._io.atomic_write_json`."""
    _io.atomic_write_json(path, payload)
