"""The one exception type for mistakes a user can fix: bad config, missing data, wrong checkpoint,
and `say`, how jobs tell the user anything else.

Entry points catch UserError, print its message as one line and exit with code 2 (no traceback).
"""

import sys


class UserError(Exception):
    """A problem with the user's input. The message says what is wrong and how to fix it."""


def say(message: str) -> None:
    """A message for the user on stderr (stdout stays for results, e.g. tables), flushed at once."""
    print(message, file=sys.stderr, flush=True)
