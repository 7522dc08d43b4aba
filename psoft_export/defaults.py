"""Defaults shared by the library and the CLI (kept free of heavy imports so ``--help`` stays instant)."""

# Randomized SVD for ``decompose``, measured on the fixtures (docs/decompose.md): q = r + 10 columns and
# 6 power iterations put the subspace within ~1e-5 rad of a float64 SVD; PEFT's q = r misses it by up to 0.6 rad.
DEFAULT_NITER = 6
DEFAULT_OVERSAMPLE = 10
