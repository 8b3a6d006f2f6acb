"""Writing figures: one PNG per figure, atomically (a killed run leaves no half-written file)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from adaptlab.io import atomic_open


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically (folders made), laid out tight."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    return path
