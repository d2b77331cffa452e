"""`FittedTemperature`: the fitted-state accessors shared by the temperature fitters."""

from __future__ import annotations

from typing import Optional


class FittedTemperature:
    """Mixin: `temperature` (1.0 until fitted) and `fitted`, over `self._temperature`."""

    _temperature: Optional[float] = None

    @property
    def temperature(self) -> float:
        """The fitted temperature (1.0 before a fit)."""
        return 1.0 if self._temperature is None else self._temperature

    @property
    def fitted(self) -> bool:
        """Whether a temperature has been fitted."""
        return self._temperature is not None
