"""One way to start and finish a matplotlib figure (the file backend, no display needed)."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend. Deferred: only plotting code pays for importing matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, **layout) -> Path:
    """Lay out, write as PNG and close (so figures do not pile up in long runs)."""
    plt = pyplot()
    fig.tight_layout(**layout)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
