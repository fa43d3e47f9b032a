"""Client-level (distributed) DP at a site: clip the round's update, add this site's noise share.

Each site clips its whole model update to L2 norm ``clip_norm`` and adds Gaussian noise of std
``noise_multiplier * clip_norm / sqrt(t)``; secure aggregation then masks it. Any ``t`` or more
shares summed carry at least the full noise ``noise_multiplier * clip_norm``, so the coordinator
never sees a sum with less than the full noise, and never sees an individual update at all.
Sites weigh equally (the guarantee bounds each site's contribution, not its sample count).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from privacy.accounting import client_level_epsilon
from privacy.dp import PrivacyRefused, SiteLimits, clip_update, noise_share

CLIENT_LEVEL_DELTA = 1e-5
"""Delta of client-level DP when the run names none (consortia have far fewer than 1e5 sites)."""


def planned_client_epsilon(
    *, noise_multiplier: float, site_sample_rate: float, rounds: int, delta: float
) -> float:
    """Client-level epsilon the whole planned run will spend."""
    return client_level_epsilon(
        noise_multiplier=noise_multiplier,
        site_sample_rate=site_sample_rate,
        rounds=rounds,
        delta=delta,
    )


def privatize_update(
    global_arrays: Mapping[str, np.ndarray],
    trained_arrays: Mapping[str, np.ndarray],
    *,
    clip_norm: float,
    noise_multiplier: float,
    noise_shares: int,
    limits: SiteLimits,
    planned_epsilon: float,
    delta: float,
) -> dict[str, np.ndarray]:
    """Return the weights to mask: global + clipped update + this site's noise share.

    Raises PrivacyRefused when the planned run exceeds this site's ceilings. Noise draws on
    OS randomness, never on a seed the coordinator knows.
    """
    limits.check(epsilon=planned_epsilon, delta=delta)
    if noise_shares < 1:
        raise PrivacyRefused("client-level DP needs the secure-aggregation threshold (>= 1).")
    update = {
        k: np.asarray(trained_arrays[k], dtype=np.float64) - np.asarray(v, dtype=np.float64)
        for k, v in global_arrays.items()
    }
    clipped, _ = clip_update(update, clip_norm=clip_norm)
    noise = noise_share(
        {k: v.shape for k, v in clipped.items()},
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        num_sites=noise_shares,
        rng=np.random.default_rng(),
    )
    return {
        k: (np.asarray(global_arrays[k], dtype=np.float64) + clipped[k] + noise[k]).astype(
            np.asarray(global_arrays[k]).dtype
        )
        for k in global_arrays
    }
