"""One exception type for every bad setting, so callers (and the CLI) can print it as one line."""


class LisaError(ValueError):
    """A setting, file or model that lisatune cannot work with. The message says which and why."""


def first_line(e: BaseException, cause: bool = False) -> str:
    """An exception as one line: its message's first line, or its type when the message is empty; with `cause`,
    of the innermost exception it was raised from (libraries that wrap what went wrong)."""
    while cause and e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
