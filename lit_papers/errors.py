"""Errors that mean "the input is wrong", which the `lit-papers` command reports as one message, not a traceback."""

from __future__ import annotations

from argparse import ArgumentError


class UserInputError(Exception):
    """A problem with the user's data, config or checkpoint that the message alone explains (base class)."""


# Errors that mean the input is wrong: reported as one message by `console_main`.
USER_ERRORS = (ArgumentError, FileNotFoundError, NotADirectoryError, UserInputError)
# Noise in jsonargparse's messages for `class_path` options, which are typed "a subclass or None".
_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes: [", "Expected a <class 'NoneType'>",
          "Given value type:")


def find_user_error(error: BaseException) -> BaseException | None:
    """The user error in `error`'s chain (jsonargparse wraps errors raised while instantiating classes), or None."""
    while error is not None:
        if isinstance(error, USER_ERRORS):
            return error
        error = error.__cause__ or error.__context__
    return None


def tidy_error(error: BaseException) -> str:
    """The message of a user error without jsonargparse's type-union noise."""
    lines = [line for line in str(error).splitlines() if not line.strip().lstrip("- ").startswith(_NOISE)]
    return "\n".join(line if len(line) < 300 else line[:300] + " ..." for line in lines)
