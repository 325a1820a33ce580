"""The one exception type for mistakes a user can fix: bad config, missing data, wrong checkpoint.

Entry points catch it, print its message as one line and exit with code 2 (no traceback).
"""


class UserError(Exception):
    """A problem with the user's input. The message says what is wrong and how to fix it."""
