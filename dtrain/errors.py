"""The one exception type the launch side raises for bad input.

The CLI turns it into a single sentence on stderr and exit code 2, never a traceback.
"""


class UsageError(Exception):
    """Bad input from the user: the message names the problem and the fix."""
