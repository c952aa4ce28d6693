"""Progress bars (training steps, evaluation batches) and log lines that print above them."""
from __future__ import annotations

import logging

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("lisatune")


def console():
    """Console log lines through tqdm.write while it is open, so they print above a bar instead of through it."""
    return logging_redirect_tqdm(tqdm_class=tqdm)


def bar(total: int, desc: str, initial: int = 0, leave: bool = True, unit: str = "it") -> tqdm:
    """A bar on stderr, shown where lisatune reports at INFO: not with --quiet, not on ranks other than 0 (their
    level is WARNING). Use it as a context manager, so an error prints on a line of its own, not after the bar."""
    return tqdm(total=total, initial=initial, desc=desc, leave=leave, unit=unit,
                disable=not log.isEnabledFor(logging.INFO))
