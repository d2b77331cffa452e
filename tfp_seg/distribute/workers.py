"""Who writes shared files in a multi-worker job: `is_chief`, `worker_dir`."""

from __future__ import annotations

import os
from typing import Optional

import tensorflow as tf


# --- multi-worker housekeeping -------------------------------------------------------------------
def task(strategy) -> tuple:
    """`(task_type, task_id)` of this process in `strategy`'s cluster (`(None, None)` if none)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    task_id = getattr(resolver, "task_id", None)
    return task_type, task_id


def is_chief(strategy: Optional[tf.distribute.Strategy] = None) -> bool:
    """True unless this process is a non-chief worker of a multi-worker job.

    The chief is the task of type "chief", or worker 0 when the cluster has no chief. Only the
    chief should write shared files (reports, models, exports).
    """
    strategy = strategy or tf.distribute.get_strategy()
    task_type, task_id = task(strategy)
    if task_type is None:
        return True
    if task_type == "chief":
        return True
    if task_type == "worker":
        cluster = getattr(strategy.cluster_resolver, "cluster_spec", lambda: None)()
        has_chief = cluster is not None and "chief" in cluster.as_dict()
        return (not has_chief) and task_id == 0
    return False


def worker_dir(path: str, strategy: Optional[tf.distribute.Strategy] = None) -> str:
    """`path` for the chief, `path/workers/<type>-<id>` (created) for the other workers.

    Every worker of a multi-worker job runs the same code; this keeps the non-chief workers'
    writes (backups, logs, models) apart from the chief's.
    """
    strategy = strategy or tf.distribute.get_strategy()
    if is_chief(strategy):
        return path
    task_type, task_id = task(strategy)
    out = os.path.join(path, "workers", f"{task_type}-{task_id}")
    os.makedirs(out, exist_ok=True)
    return out
