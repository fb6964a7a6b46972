"""Pure metric functions any stage may use."""

from __future__ import annotations

import math


def perplexity(mean_loss: float) -> float:
    """exp of the mean per-token cross-entropy (capped so a diverged run prints inf, not an error)."""
    return math.exp(mean_loss) if mean_loss < 700 else math.inf
