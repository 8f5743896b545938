"""The exceptions users see: a one-line message, no traceback, and the exit code the CLI returns."""

EXIT_USER_ERROR = 2
EXIT_ENVIRONMENT_FAULT = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class QuantkitError(Exception):
    """An expected failure caused by the user's input (bad path, bad recipe, bad weights).

    The CLI prints ``error: <message>`` and exits with ``exit_code``; the message must stand on one
    line and name the file or tensor at fault.
    """

    exit_code = EXIT_USER_ERROR


class EnvironmentFault(QuantkitError):
    """A failure of the machine rather than of the input: a full disk, a missing permission, no memory."""

    exit_code = EXIT_ENVIRONMENT_FAULT
