"""The base of every configuration section, and the problem a validator raises for one list item.

Entry points: :class:`Section` (``extra="forbid"``, assignments validated) and :class:`ItemProblem`
(:mod:`tuneloop.config.problems` turns it into a ConfigError line with the item's key path).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """The base of every section: an unknown key is an error, and an assignment is validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ItemProblem(ValueError):
    """A validator's problem reported as ``<key path><sub>: <text>`` (``sub`` names a list item: ``[1]``)."""

    def __init__(self, sub: str, text: str) -> None:
        super().__init__(text)
        self.sub, self.text = sub, text
