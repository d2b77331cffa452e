"""The default-loss registry: likelihood name -> loss class.

Heads declare the name of their likelihood (`head.likelihood`); `tfp_seg.losses` registers,
where each loss is defined, the loss class that is the negative log-likelihood of that name.
The registry lives below both, so `head.default_loss()` works without layers importing
losses; importing `tfp_seg` (or `tfp_seg.losses`) fills it.

```none
losses:  @register_default_loss("low_rank_normal_logits") class StochasticSegmentationNLL
layers:  head.default_loss(**kw) -> default_loss(head, **kw)
                                 -> loss_class(head.likelihood).from_head(head, **kw)
```
"""

from __future__ import annotations

from typing import Any, Callable, Dict, TypeVar

from tfp_seg import protocols

__all__ = ["register_default_loss", "loss_class", "registered_likelihoods", "default_loss"]

_LOSSES: Dict[str, type] = {}

T = TypeVar("T", bound=type)


def register_default_loss(likelihood: str) -> Callable[[T], T]:
    """Class decorator: register a loss class as the default loss of `likelihood`.

    The class must offer `from_head(head, **kwargs)`. Registering a second class for the same
    name is an error (one likelihood, one default loss).
    """
    if not isinstance(likelihood, str) or not likelihood:
        raise ValueError(f"`likelihood` must be a non-empty str; got {likelihood!r}.")

    def register(cls: T) -> T:
        current = _LOSSES.get(likelihood)
        if current is not None and current is not cls:
            raise ValueError(
                f"Likelihood {likelihood!r} already has a default loss "
                f"({current.__module__}.{current.__qualname__}); cannot register "
                f"{cls.__module__}.{cls.__qualname__}."
            )
        if not callable(getattr(cls, "from_head", None)):
            raise TypeError(f"{cls.__qualname__} must define `from_head(head, **kwargs)`.")
        _LOSSES[likelihood] = cls
        return cls

    return register


def registered_likelihoods() -> tuple:
    """The likelihood names that have a default loss, sorted."""
    return tuple(sorted(_LOSSES))


def loss_class(likelihood: Any) -> type:
    """The loss class registered for `likelihood`, or a `ValueError` naming the known ones."""
    cls = _LOSSES.get(likelihood) if isinstance(likelihood, str) else None
    if cls is None:
        known = ", ".join(repr(name) for name in registered_likelihoods()) or "none"
        raise ValueError(
            f"No default loss is registered for likelihood {likelihood!r} (registered: "
            f"{known}). Import `tfp_seg.losses` (it registers the built-in losses), register "
            "one with `tfp_seg.losses.register_default_loss`, or pass a loss explicitly."
        )
    return cls


def default_loss(head: Any, **kwargs):
    """The registered default loss of `head.likelihood`, built by `from_head(head, **kwargs)`."""
    if not isinstance(head, protocols.Head):
        raise ValueError(
            "`head` must be a distribution head (tfp_seg.protocols.Head, e.g. a "
            f"tfp_seg.layers.DistributionHead); got {type(head).__name__}."
        )
    likelihood = head.likelihood
    if likelihood is None:
        raise ValueError(
            f"{type(head).__name__} declares no `likelihood`, so it has no default loss; "
            "set the class attribute `likelihood` or pass a loss explicitly."
        )
    return loss_class(likelihood).from_head(head, **kwargs)
