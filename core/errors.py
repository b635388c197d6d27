"""The one exception class meant for users: its message says what is wrong and what to do."""


class FixativeError(Exception):
    """An expected mistake (bad input, missing file, wrong checkpoint).

    The command line prints the message on one line, without a traceback.
    """
