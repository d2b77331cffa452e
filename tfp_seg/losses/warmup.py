"""`MeanWarmup`: train an SSN's mean logits alone for the first epochs.

The SSN loss (`StochasticSegmentationNLL`) scores whole samples of the logits distribution.
At the start of training the mean logits are uninformed, every sample is far from every
label map, and the joint term's gradient goes to the sample closest to the labels: the
factor learns to produce large, varied deviations before the mean has learnt the shapes.
On small backbones this leaves over-diverse samples around a poor mean
(`benchmarks/README.md`, "Mean warm-up"). A warm-up trains the mean on the cross-entropy of
its logits first (the deterministic head's loss, on the same labels); the covariance
channels get no gradient and stay at their small initial scale until the SSN loss takes
over.

```python
head = tfp_seg.layers.LowRankLogits(2, rank=10)
model = tfp_seg.models.ProbabilisticSegmenter(backbone, head)
model.compile("adam", loss=head.default_loss(mean_warmup=True))
model.fit(data, epochs=36, callbacks=[tfp_seg.losses.MeanWarmup(epochs=6)])
```

The switch is a variable of the loss, so the step function is traced once and the loss
stays the SSN loss wherever no `MeanWarmup` runs (evaluation, a later `fit`). A resumed
run (`keras.callbacks.BackupAndRestore`) continues by the epoch index, like the schedules.
The loss takes one branch per step (`tf.cond`): the warm-up epochs do not compute the SSN
terms. TensorFlow may log "Type inference failed ... while inferring type of node
'.../cond/output/...'" when it builds that step: a known, harmless message of its graph
type checker on conditionals (tensorflow/tensorflow#57052); values and gradients of both
branches are tested (`tests/losses/test_mean_warmup.py`).
"""

import keras

from tfp_seg import _checks


class MeanWarmup(keras.callbacks.Callback):
    """Train only the mean logits for the first `epochs` epochs of `fit` (see the module).

    The model must be compiled with `StochasticSegmentationNLL(..., mean_warmup=True)` (a
    loss dict / list may hold it). In epochs `0 .. epochs - 1` the loss is the mean logits'
    cross-entropy, also as the validation loss of those epochs; from epoch `epochs` on, and
    after `fit`, it is the SSN loss. `epochs=0` changes nothing.
    """

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = _checks.positive_int(epochs, "epochs", minimum=0)
        self._switches: list = []

    def _find_switches(self) -> list:
        found, pending = [], [getattr(self.model, "loss", None)]
        while pending:
            loss = pending.pop()
            if isinstance(loss, dict):
                pending.extend(loss.values())
            elif isinstance(loss, (list, tuple)):
                pending.extend(loss)
            else:
                switch = getattr(loss, "mean_only", None)
                if switch is not None:
                    found.append(switch)
        if not found:
            raise ValueError(
                "MeanWarmup needs a model compiled with a loss built with `mean_warmup=True` "
                "(tfp_seg.losses.StochasticSegmentationNLL, or LowRankLogits.default_loss("
                f"mean_warmup=True)); got loss {getattr(self.model, 'loss', None)!r}."
            )
        return found

    def _set(self, on: bool) -> None:
        for switch in self._switches:
            switch.assign(1.0 if on else 0.0)

    def on_train_begin(self, logs=None):
        self._switches = self._find_switches()

    def on_epoch_begin(self, epoch, logs=None):
        self._set(epoch < self.epochs)

    def on_train_end(self, logs=None):
        self._set(False)
