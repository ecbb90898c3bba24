"""String-valued options: one base class whose ``parse`` explains bad values."""

from __future__ import annotations

import re
from enum import Enum
from typing import TypeVar

_O = TypeVar("_O", bound="Option")


class Option(str, Enum):
    """A string option; subclasses list the valid values as members.

    ``parse`` accepts a member or its value; anything else raises ``ValueError`` that names
    the option (the class's ``option_name``) and lists the valid values.
    """

    @classmethod
    def option_name(cls) -> str:
        """Name of the option in error messages: the class name in lower-case words (``CenterMode``: center mode)."""
        return re.sub(r"(?<!^)(?=[A-Z])", " ", cls.__name__).lower()

    @classmethod
    def parse(cls: type[_O], value: _O | str) -> _O:
        """Return the member for ``value``; a bad value raises ``ValueError`` listing the valid ones."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown {cls.option_name()} {value!r}; valid choices: {valid}") from None
