"""`BackupAndRestore`: Keras' backup callback, atomic, multi-worker aware, with the full history."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Optional

import keras
import tensorflow as tf

from tfp_seg import _io
from tfp_seg.distribute import workers

# --- fault tolerance -----------------------------------------------------------------------------
_METADATA = "training_metadata.json"
_FORMAT = "tfp_seg.backup/1"


def _to_float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` with atomic writes, full history and worker folders.

    At the end of every epoch (`save_freq="epoch"`) or every `save_freq` batches it writes

    ```none
    <backup_dir>/epoch-<e>-batch-<b>.weights.h5   model + optimiser state (a new file each time)
    <backup_dir>/training_metadata.json           {"epoch", "batch", "weights", "history"}
    ```

    the weights first, then the metadata naming them (renamed into place), then it deletes the
    previous weights file: a kill at any point leaves a metadata file that names a complete
    weights file. On `fit`'s start it restores the weights and optimiser state and sets the
    initial epoch. `history` holds the logs of every completed epoch, restored ones included.
    Non-chief workers of a multi-worker job back up to a sibling folder
    `<backup_dir>-<type>-<id>` (not inside `backup_dir`, which the chief deletes at the end).

    Args:
      backup_dir: folder of the backup (only this callback's files may live there).
      save_freq: "epoch" or an int number of batches.
      delete_checkpoint: delete the backup when `fit` completes.
      strategy: the training strategy (default: the current one), for the worker folders.
      per_worker: give non-chief workers their own folder (False when `backup_dir` already is
        per worker, e.g. under `worker_dir(...)`).

    #### Examples

    ```python
    backup = tfp_seg.distribute.BackupAndRestore("runs/ssn/backup")
    model.fit(ds, epochs=20, callbacks=[backup])     # killed at epoch 7? run it again:
    model.fit(ds, epochs=20, callbacks=[backup])     # continues with epoch 8 (index 7)
    backup.history["loss"]                            # all 20 epochs
    ```
    """

    def __init__(
        self,
        backup_dir: str,
        save_freq="epoch",
        delete_checkpoint: bool = True,
        strategy: Optional[tf.distribute.Strategy] = None,
        per_worker: bool = True,
    ):
        if not backup_dir:
            raise ValueError("`backup_dir` must be a non-empty path.")
        if strategy is None:
            strategy = tf.distribute.get_strategy()
        if per_worker and not workers.is_chief(strategy):
            task_type, task_id = workers.task(strategy)
            backup_dir = f"{os.path.normpath(backup_dir)}-{task_type}-{task_id}"
        super().__init__(
            backup_dir=backup_dir,
            save_freq=save_freq,
            double_checkpoint=False,
            delete_checkpoint=delete_checkpoint,
        )
        self.history: dict = {}
        self.restored_epoch = 0

    @staticmethod
    def read_state(backup_dir: str) -> Optional[dict]:
        """The backup's metadata (`{"epoch", "batch", "weights", "history"}`), or None."""
        path = os.path.join(backup_dir, _METADATA)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"corrupt backup metadata {path}: {exc}") from exc
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(
                f"{path} is not a tfp_seg backup (format {_FORMAT!r}); the folder must hold only "
                "this callback's files."
            )
        return state

    def completed_epochs(self) -> int:
        """Epochs completed according to the backup (0 without one)."""
        state = self.read_state(self.backup_dir)
        return 0 if state is None else int(state["epoch"])

    def on_train_begin(self, logs=None):
        self._load_model()

    def _load_model(self):
        if not self.model.built:
            raise ValueError(
                "BackupAndRestore needs a built model before fit(): call model.build(shape) "
                "or run it on a batch first."
            )
        state = self.read_state(self.backup_dir)
        if state is None:
            self.history = {}
            self.restored_epoch = 0
            return
        weights = os.path.join(self.backup_dir, state["weights"])
        if not os.path.isfile(weights):
            raise ValueError(
                f"backup {self.backup_dir} names {state['weights']}, which is missing."
            )
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(weights)
        self.restored_epoch = int(state["epoch"])
        self.history = {k: list(v) for k, v in state.get("history", {}).items()}
        self.model._initial_epoch = self.restored_epoch
        self._current_epoch = self.restored_epoch

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(_to_float(value))
        super().on_epoch_end(epoch, logs)

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"epoch-{self._current_epoch}-batch-{self._last_batch_seen}.weights.h5"
        target = os.path.join(self.backup_dir, name)
        # Temporary names keep the suffix: `epoch-<e>-batch-<b>.tmp-<random>.weights.h5`.
        with _io.atomic_path(target) as tmp:
            self.model.save_weights(tmp, overwrite=True)
        _io.atomic_write_json(
            os.path.join(self.backup_dir, _METADATA),
            {
                "format": _FORMAT,
                "epoch": self._current_epoch,
                "batch": self._last_batch_seen,
                "weights": name,
                "history": self.history,
            },
            indent=None,
            sort_keys=False,
        )
        stem, suffix = os.path.splitext(_METADATA)
        for other in os.listdir(self.backup_dir):
            older = other.endswith(".weights.h5") and other != name  # and stale partial ones
            partial = other.startswith(f"{stem}.tmp-") and other.endswith(suffix)  # killed writes
            if older or partial:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.backup_dir, other))
