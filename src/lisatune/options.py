"""The base of every config section: unknown keys are errors, and build() reports one line."""
from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import LisaError


def format_validation_error(e: ValidationError, model: type[BaseModel], where: str) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    if not loc:  # a whole-section check: its message names the fields
        return f"{where}: {err['msg'].removeprefix('Value error, ')}"
    if err["type"] == "extra_forbidden":
        valid = ", ".join(sorted(model.model_fields))
        return f"{where}: unknown option '{loc}' (valid: {valid})"
    return f"{where}.{loc}: {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    section: ClassVar[str] = "options"  # how errors name this section, e.g. "lisa"

    @classmethod
    def build(cls, **options):
        """Validate options, turning pydantic's report into one LisaError line."""
        try:
            return cls(**options)
        except ValidationError as e:
            raise LisaError(format_validation_error(e, cls, cls.section)) from None
