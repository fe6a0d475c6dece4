"""User-facing errors: one line naming the thing, the value and the fix."""


class DeepSeekError(Exception):
    """A mistake in the user's input (model path, config, tensor, option).

    The CLI prints ``str(error)`` as one line and exits non-zero; ``--debug`` shows the
    traceback.
    """


class ConfigError(DeepSeekError):
    """config.json is missing a field, has an impossible value, or names an unknown model."""


class CheckpointError(DeepSeekError):
    """A checkpoint folder is missing files or tensors, or a tensor has the wrong shape."""


class OutOfMemoryError(DeepSeekError):
    """The model (weights + a default context's cache) cannot fit in this machine's memory."""


class ArgumentValueError(DeepSeekError, ValueError):
    """An API argument or CLI option has a value outside what it accepts (also a ValueError)."""


class ArgumentTypeError(DeepSeekError, TypeError):
    """An API argument has the wrong type, e.g. a number given as a string (also a TypeError)."""
