"""The errors personalign raises on bad input.

Every error carries a one-line message that names the problem and, where there is one, the fix.
The CLI prints that line and exits non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations


class PersonalignError(Exception):
    """Base class: a problem the user can fix from the message alone.

    ``field``: the option or request field at fault, where one is (the server names it in its error object).
    """

    def __init__(self, *args: object, field: str | None = None) -> None:
        super().__init__(*args)
        self.field = field


class PreferenceError(PersonalignError, ValueError):
    """An unknown side, a malformed weight, or an invalid combination."""


class ConfigError(PersonalignError, ValueError):
    """A malformed or unknown configuration field."""


class DataError(PersonalignError, ValueError):
    """A missing, empty or malformed data file."""


class ModelError(PersonalignError, RuntimeError):
    """A model that cannot be found, converted or loaded."""
