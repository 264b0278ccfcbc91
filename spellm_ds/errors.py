"""The one exception type for problems a user can fix.

Entry points catch it and print its message as a single line (no traceback) with a non-zero
exit; every message names the problem and how to fix it.
"""


class SpellmError(Exception):
    """Bad input or configuration: the message says what is wrong and what to do instead."""


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (or its type), for a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
