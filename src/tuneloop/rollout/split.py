"""The traffic split: which arm of a running rollout answers a request.

``choose_arm(rollout, user_key, request_id)`` returns ``"canary"`` or ``"baseline"``:

* with a user key (the OpenAI ``user`` field, else the ``x-tuneloop-user`` header), ``u = sha256(rollout id,
  user key)`` read as a number in [0, 1) and the request goes to the canary when ``u < weight``. The same user
  gets the same arm for the whole rollout, and as the weight steps up (5 % -> 25 % -> ...) the users already on
  the canary stay there (``u`` is fixed, the threshold only grows). The rollout id is part of the hash, so a
  new rollout draws a new set of canary users;
* without a user key, the same test on ``sha256(rollout id, request id)``: an independent draw per request.

No running rollout (``None``, or ended) means ``"baseline"``: the champion answers. The gateway applies the
split only to requests for ``name`` and ``name@champion``; requests naming a version (``name:3``) or another
alias are never split and are logged with arm ``"direct"`` (that arm is the gateway's, not this module's).
"""

from __future__ import annotations

import hashlib
from typing import Literal

from tuneloop.registry.rollouts import Rollout

Arm = Literal["baseline", "canary"]
_SCALE = float(1 << 64)


def unit_hash(*parts: str) -> float:
    """A uniform number in [0, 1) from the sha256 of ``parts`` (first 8 bytes, big-endian)."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def choose_arm(rollout: Rollout | None, user_key: str | None, request_id: str) -> Arm:
    """``"canary"`` or ``"baseline"`` for one request (see the module docstring)."""
    if rollout is None or rollout.status != "running":
        return "baseline"
    weight = float(rollout.weight or 0.0)
    if weight <= 0.0:
        return "baseline"
    key = f"user:{user_key}" if user_key else f"request:{request_id}"
    return "canary" if unit_hash(str(rollout.rollout_id), key) < weight else "baseline"
