"""One way to finish a matplotlib figure."""
from __future__ import annotations

from pathlib import Path


def save_figure(fig, path, **layout) -> Path:
    """Lay out, write as PNG and close (so figures do not pile up in long runs)."""
    import matplotlib.pyplot as plt  # lazy: only plotting code pays for matplotlib

    fig.tight_layout(**layout)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
