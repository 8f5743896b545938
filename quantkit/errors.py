"""The one exception type users see: a one-line message, no traceback."""


class QuantkitError(Exception):
    """An expected failure caused by the user's input (bad path, bad recipe, bad weights).

    The CLI prints ``error: <message>`` and exits non-zero; the message must stand on one
    line and name the file or tensor at fault.
    """
