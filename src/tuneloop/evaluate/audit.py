"""The audit trail of an evaluation: what identifies a prompt in ``items.jsonl``.

Shared by every suite kind (:mod:`.suites`, :mod:`.lmeval`), so it sits below both.
"""

from __future__ import annotations

import hashlib


def prompt_sha256(text: str) -> str:
    """The sha256 of a prompt as UTF-8 text: its identity in the audit records."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
