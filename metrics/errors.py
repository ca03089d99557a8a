"""The one error type the metrics package raises for bad inputs."""


class MetricsInputError(ValueError):
    """A bad whole-job input (file, array, statistics): the message names it and says what is wrong.

    A ValueError, so callers that already catch ValueError keep working; the CLI turns it into one line
    on stderr and exit code 2.
    """
