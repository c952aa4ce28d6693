"""One exception type for every bad setting, so callers (and the CLI) can print it as one line."""


class LisaError(ValueError):
    """A setting, file or model that lisatune cannot work with. The message says which and why."""
