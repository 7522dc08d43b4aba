"""The pictures the commands write beside their outputs (matplotlib, imported only when drawing)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch


def plot_spectra(tensors: dict, records: dict, rank: int, path: Path, kind_of: Callable[[str], str]) -> None:
    """Cumulative fraction of spectral energy vs. rank, one line per target kind (mean over layers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    by_kind: dict[str, list[torch.Tensor]] = {}
    for name, rec in records.items():
        S2 = tensors[f"{name}.S"].double().square()
        frob2 = float(S2[:rank].sum()) / rec["energy"] if rec["energy"] > 0 else 1.0
        by_kind.setdefault(kind_of(name), []).append(S2.cumsum(0) / frob2)
    for kind, curves in sorted(by_kind.items()):
        n = min(len(c) for c in curves)
        mean = torch.stack([c[:n] for c in curves]).mean(0)
        ax.plot(range(1, n + 1), mean.numpy(), label=f"{kind} ({len(curves)})")
    ax.axvline(rank, color="grey", linestyle="--", linewidth=1)
    ax.text(rank, 0.02, f" r={rank}", color="grey")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("rank k")
    ax.set_ylabel("fraction of spectral energy kept (sum of top-k σ² / ||W||²_F)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Principal-subspace energy by target kind")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
