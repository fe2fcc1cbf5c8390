"""The one exception type for bad user input; the CLI prints its message on one line, exit 2."""


class ByteifyError(Exception):
    """A problem with the user's input (file, key, value) that byteify can name in one line."""
