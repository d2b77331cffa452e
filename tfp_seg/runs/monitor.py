"""Validation curves of a run: GED, HM-IoU and sample diversity every few epochs.

`ValidationMonitor` is a Keras callback. After epoch `e` (1-based) with `e % val_every == 0`,
and after the last epoch, it draws `num_samples` samples of each of the first `num_images`
validation images with one fixed seed (the same noise at every evaluation, so the curves move
with the weights alone) and scores them with the library's evaluation:

- the built-in benchmark (`AmbiguousShapes`): `tfp_seg.evaluation.evaluate_ambiguous`, against
  the exact label distribution (unbiased U-statistics), with the oracle's values;
- users' data: `tfp_seg.evaluation.evaluate_annotations` against the raters (the literature's
  V-statistics; no extra sample counts), with the raters' diversity.

It writes into the logs of that epoch

```none
val_ged          D²_GED of the samples (the report's `ged`)
val_hm_iou       Hungarian-matched IoU against the annotations (`hm_iou`)
val_diversity    E[d(S, S')] of the samples (`diversity`)
val_eval_epoch   the epoch (1-based) they belong to
```

so the progress bar shows them, `fit`'s `History` records them and a
`tfp_seg.distribute.BackupAndRestore` placed after it in the callback list stores them with
that epoch's weights: a resumed run's history holds the values of the restored epochs, and
they stay aligned with their epochs. `history_record` turns such a history into the form of
`history.json`:

```none
val_eval_epochs        [n] ints, the evaluated epochs (n <= E = len(loss))
val_ged, val_hm_iou, val_diversity     [n] each, aligned with val_eval_epochs
oracle_val_ged, oracle_val_hm_iou, oracle_val_diversity   floats (built-in benchmark)
val_reference_diversity                float: the raters' E[d(Y, Y')] (users' data)
```

The reference values depend on the images, the seed and the number of samples only (the
oracle's samples come from a seeded generator), so every evaluation gives the same ones.

A deep ensemble (`head="ensemble"`) fits its members one after the other; while member `i`
trains, its monitor evaluates the ensemble of members `0..i` (`validation_sampler`): member
`i`'s curves are those of the growing ensemble, and the last member's are the whole ensemble's.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping, Optional

import keras

from tfp_seg import _checks, distribute
from tfp_seg.data import AmbiguousShapes
from tfp_seg.evaluation import evaluate_ambiguous, evaluate_annotations
from tfp_seg.models.wrappers import DeepEnsemble
from tfp_seg.plots.curves import EPOCHS_KEY, VALIDATION_CURVES  # what the figure plots
from tfp_seg.runs.config import TrainConfig
from tfp_seg.runs.dice import VOLUME_BATCH
from tfp_seg.runs.model import sampler_for

__all__ = [
    "CURVE_KEYS",
    "ValidationMonitor",
    "history_record",
    "make_monitor",
    "report_facts",
    "validation_sampler",
]

# report key -> log / history key: ged -> val_ged, hm_iou -> val_hm_iou, diversity -> ...
METRIC_KEYS = {key.removeprefix("val_"): key for key in VALIDATION_CURVES}
EPOCH_KEY = "val_eval_epoch"  # in the logs, one epoch number per evaluation
CURVE_KEYS = (EPOCHS_KEY, *METRIC_KEYS.values())
"""The per-evaluation lists of `history.json` (all of the same length)."""
# report key of the evaluation -> history.json / report.json key of the reference value
_ORACLE_KEYS = {f"oracle_{k}": f"oracle_{v}" for k, v in METRIC_KEYS.items()}
_RATER_KEYS = {"reference_diversity": "val_reference_diversity"}


class ValidationMonitor(keras.callbacks.Callback):
    """Scores `sampler` on `data` after every `val_every`-th epoch and after the last one.

    Args:
      make_sampler: a function of no arguments that returns what is evaluated: anything with
        `sample_logits(x, num_samples, seed=, batch_size=)` over the model being trained (the
        run's sampler, `validation_sampler`). Called at the first evaluation, when the model
        is built (`MCDropout` looks for the dropout layers of a built model).
      data: the validation images: `AmbiguousShapes` (exact evaluation) or a data set with
        `images [B, H, W, ch]` and `annotations [B, K, H, W]` (`AnnotatedImages`).
      val_every: evaluate after the epochs `e` (1-based) with `e % val_every == 0`.
      epochs: the run's epochs: the last one is always evaluated.
      num_samples: samples per image (>= 2).
      seed: the sampling seed of every evaluation.
      batch_size: images per `sample_logits` call.

    After `fit`: `seconds` is the time spent evaluating, `reference` the reference values
    (`oracle_val_*` or `val_reference_diversity`) of the last evaluation (None before one).
    """

    def __init__(
        self,
        make_sampler: Callable,
        data,
        val_every: int,
        epochs: int,
        num_samples: int = 16,
        seed=0,
        batch_size: int = 16,
    ):
        super().__init__()
        if not callable(make_sampler):
            raise ValueError(f"`make_sampler` must be a function; got {make_sampler!r}.")
        self.make_sampler = make_sampler
        self.sampler = None
        self.data = data
        self.val_every = _checks.positive_int(val_every, "val_every")
        self.epochs = _checks.positive_int(epochs, "epochs")
        self.num_samples = _checks.positive_int(num_samples, "num_samples", minimum=2)
        self.seed = seed
        self.batch_size = _checks.positive_int(batch_size, "batch_size")
        self.seconds = 0.0
        self.reference: Optional[dict] = None

    def due(self, epoch: int) -> bool:
        """Whether the 1-based `epoch` is evaluated."""
        return epoch % self.val_every == 0 or epoch == self.epochs

    def evaluate(self) -> dict:
        """The evaluation report of the sampler on the validation images now; sets
        `reference`."""
        start = time.perf_counter()
        if self.sampler is None:
            self.sampler = self.make_sampler()
        if isinstance(self.data, AmbiguousShapes):
            report = evaluate_ambiguous(
                self.sampler,
                self.data,
                num_samples=self.num_samples,
                seed=self.seed,
                batch_size=self.batch_size,
            )
            names = _ORACLE_KEYS
        else:
            report = evaluate_annotations(
                self.sampler,
                self.data,
                num_samples=self.num_samples,
                seed=self.seed,
                batch_size=self.batch_size,
                sample_counts=(),
            )
            names = _RATER_KEYS
        self.seconds += time.perf_counter() - start
        self.reference = {new: float(report[old]) for old, new in names.items()}
        return report

    def reference_values(self) -> dict:
        """`reference`, from one evaluation now if this process made none (a resumed run
        whose epochs were all done before)."""
        if self.reference is None:
            self.evaluate()
        return dict(self.reference)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or not self.due(epoch + 1):
            return
        report = self.evaluate()
        for old, new in METRIC_KEYS.items():
            logs[new] = float(report[old])
        logs[EPOCH_KEY] = epoch + 1


def validation_sampler(model, config: TrainConfig, member: int = 0):
    """What the monitor samples: the run's sampler (`sampler_for`); for a deep ensemble while
    member `member` trains, the ensemble of members `0..member`."""
    if config.head == "ensemble":
        return DeepEnsemble(model.members[: member + 1], head_sampling=model.head_sampling)
    return sampler_for(model, config)


def make_monitor(
    model, config: TrainConfig, val_data, strategy=None, member: int = 0, log: Callable = print
) -> Optional[ValidationMonitor]:
    """The run's `ValidationMonitor` (member `member` of a deep ensemble), or None: with
    `val_every = 0`, on the non-chief workers of a multi-worker job (the chief evaluates; the
    sampling reads the variables locally, with no collective op), or without validation
    images. It takes the first `config.val_images` images of `val_data`."""
    if not config.val_every or not distribute.is_chief(strategy):
        return None
    if len(val_data) == 0:
        if member == 0:
            log("no validation images: no validation curves")
        return None
    return ValidationMonitor(
        lambda: validation_sampler(model, config, member),
        val_data[: config.val_images],
        val_every=config.val_every,
        epochs=config.epochs,
        num_samples=config.val_samples,
        seed=config.seed,
        # NIfTI volumes one at a time (tfp_seg.runs.dice.VOLUME_BATCH); 16 images otherwise
        batch_size=VOLUME_BATCH if config.patch_data else 16,
    )


def history_record(history: Mapping[str, list]) -> dict:
    """A `fit` or `BackupAndRestore` history as in `history.json`: every list as floats, the
    logs' `val_eval_epoch` as the int list `val_eval_epochs`."""
    out = {k: [float(v) for v in values] for k, values in history.items() if k != EPOCH_KEY}
    if EPOCH_KEY in history:
        out[EPOCHS_KEY] = [int(round(float(v))) for v in history[EPOCH_KEY]]
    lengths = {k: len(out[k]) for k in CURVE_KEYS if k in out}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"validation curves of different lengths in the history: {lengths}")
    return out


def report_facts(history: Mapping) -> dict:
    """The report.json values of the validation curves: the last evaluation's `val_ged`,
    `val_hm_iou`, `val_diversity` and the reference values (`oracle_val_*`,
    `val_reference_diversity`) of `history`; `{}` without curves."""
    facts = {k: history[k][-1] for k in METRIC_KEYS.values() if history.get(k)}
    if facts:
        facts["val_eval_epoch"] = history[EPOCHS_KEY][-1]
        names = (*_ORACLE_KEYS.values(), *_RATER_KEYS.values())
        facts.update({k: history[k] for k in names if k in history})
    return facts
