"""psoft-export: model surgery and export for orthogonal fine-tuning (PSOFT, OFTv2).

The library surface is a handful of verbs; the ``psoft-export`` CLI calls exactly these. Heavy imports
(torch, transformers) happen on first use, so ``psoft-export --help`` starts instantly.
"""

from __future__ import annotations

import importlib

from psoft_export.errors import PsoftExportError, UserInputError, VerificationError

__version__ = "0.2.0"

_LAZY = {
    "OftConfig": "psoft_export.adapters",
    "PsoftConfig": "psoft_export.adapters",
    "inject": "psoft_export.adapters",
    "merge_and_unload": "psoft_export.adapters",
}

__all__ = ["PsoftExportError", "UserInputError", "VerificationError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'psoft_export' has no attribute {name!r}")
