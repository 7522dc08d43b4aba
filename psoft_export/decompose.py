"""``psoft-export decompose``: the command's presentation (the table, the ill-posed warning).

The work (computing, storing and reading decompositions) is the library module :mod:`psoft_export.decomposition`,
which ``train`` uses too; its names are re-exported here for the Python API (``from psoft_export.decompose import
decompose, Decomposition``).
"""

from __future__ import annotations

from psoft_export.decomposition import (  # noqa: F401  (re-exported: the Python API)
    FACTORS_FILE,
    FORMAT,
    MANIFEST_FILE,
    PLOT_FILE,
    Decomposition,
    decompose,
)


def ill_posed_warning(manifest: dict) -> str:
    """One line naming how many targets are ill-posed at this rank and what follows."""
    names = manifest["ill_posed"]
    worst = max(names, key=lambda n: manifest["targets"][n]["f32_angle"])
    t = manifest["targets"][worst]
    return (
        f"warning: {len(names)} of {len(manifest['targets'])} targets have s_r/s_r+1 too close to 1 at rank "
        f"{manifest['rank']} (worst {worst}: {t['gap']:.5f}): another SVD, PEFT's included, may return another "
        f"subspace (up to {t['f32_angle']:.1e} rad); the stored factors are exact and every load here uses them"
    )


def format_table(manifest: dict) -> str:
    """The terminal table: one row per target kind."""
    r = manifest["rank"]
    rows = [("target kind", "count", "shape (out x in)", f"energy kept @ r={r}", "min", f"min gap s{r}/s{r + 1}")]
    for kind, k in manifest["kinds"].items():
        shapes = ", ".join(f"{o}x{i}" for o, i in k["shapes"])
        gap = "-" if k.get("gap_min") is None else f"{k['gap_min']:.4f}"
        rows.append((kind, str(k["count"]), shapes, f"{k['energy_mean']:.1%}", f"{k['energy_min']:.1%}", gap))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
