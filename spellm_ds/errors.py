"""The one exception type for problems a user can fix.

Entry points catch it and print its message as a single line (no traceback) with a non-zero
exit; every message names the problem and how to fix it.
"""


class SpellmError(Exception):
    """Bad input or configuration: the message says what is wrong and what to do instead."""
