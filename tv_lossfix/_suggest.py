"""The one "did you mean" helper, for every error that names an unknown key, flag or name."""

import difflib
from typing import Iterable


def did_you_mean(word: object, choices: Iterable[str], prefix: str = "") -> str:
    """``"; did you mean 'prefix+match'?"`` for the closest of ``choices``, or ``""``."""
    hint = difflib.get_close_matches(str(word), sorted(str(c) for c in choices), n=1)
    return f"; did you mean {prefix + hint[0]!r}?" if hint else ""
