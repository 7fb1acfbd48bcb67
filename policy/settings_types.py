"""Strict building blocks of the settings sections each package owns (`*/settings.py`).

They live in the lowest layer so that every package's section can use them without an import
running up; the run's `Config` (controller/config.py) composes the sections.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number here")
    return value


# Numbers that refuse booleans (pydantic would read true as 1). Numeric strings stay accepted: YAML
# 1.1 reads `1e-4` (no dot) as a string.
Int = Annotated[int, BeforeValidator(_not_a_bool)]
Real = Annotated[float, BeforeValidator(_not_a_bool)]


class Section(BaseModel):
    """A settings section: unknown keys are errors, and no infinities or NaN (never a count, a rate or a size)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
