"""Earlier name of the run reports, now `tfp_seg.runs.report` (markdown, `report.json`) and
`tfp_seg.runs.figures` (the PNGs): every public name is re-exported here.

```python
from tfp_seg.runs.report import write_report       # the current name
from tfp_seg.reporting import write_report         # still works
```
"""

from __future__ import annotations

from tfp_seg.runs.report import (
    METRICS,
    PathLike,  # noqa: F401  (re-exported)
    render_markdown,
    write_report,
)

__all__ = ["METRICS", "render_markdown", "write_report"]
