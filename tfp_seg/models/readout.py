"""Compatibility alias: `SampleReadout` is `tfp_seg.models.sampling.Sampler`.

The model-level sampling read-outs live in `tfp_seg.models.sampling`; this module keeps the
old import path `tfp_seg.models.readout.SampleReadout` working.
"""

from __future__ import annotations

from tfp_seg.models.sampling import Sampler as SampleReadout

__all__ = ["SampleReadout"]
