"""What a training run depends on, as a plain dataclass (no torch import, so ``psoft-export --help`` is instant).

Stored in every checkpoint so ``--resume`` continues the same run. ``None`` fields are resolved by ``train``
before the first step (the rank from the decomposition, the learning rate per method) and stored resolved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

from psoft_export.errors import UserInputError

DEFAULT_RANK = 32
# Peak learning rates per method, measured on real checkpoints (docs/train.md, "Choosing the learning rate").
DEFAULT_LR = {"psoft": 1e-2, "oft": 5e-3}
SVD_CHOICES = ("exact", "full", "lowrank")
QUANTIZE_CHOICES = ("nf4",)  # train --quantize: bitsandbytes schemes QOFT trains over (psoft_export/quantized.py)


@dataclass
class TrainConfig:
    """Everything a run depends on; stored in each checkpoint so ``--resume`` continues the same run."""

    method: str = field(default="psoft", metadata={"help": "psoft or oft."})
    rank: Optional[int] = field(
        default=None, metadata={"help": f"PSOFT rank r (default: the decomposition's rank, else {DEFAULT_RANK})."}
    )
    alpha: Optional[float] = field(
        default=None, metadata={"help": "PSOFT scaling numerator (default: the decomposition's, else r)."}
    )
    block_size: int = field(default=32, metadata={"help": "OFT block size b."})
    targets: str = field(default="all-linear", metadata={"help": "all-linear, names (q_proj,v_proj) or a regex."})
    steps: Optional[int] = field(default=None, metadata={"help": "Optimizer steps (default: one epoch)."})
    epochs: Optional[float] = field(default=None, metadata={"help": "Epochs, when --steps is not given."})
    lr: Optional[float] = field(
        default=None,
        metadata={
            "help": "Peak learning rate (default: " + ", ".join(f"{m} {v:g}" for m, v in DEFAULT_LR.items()) + ")."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Rows per micro-batch (per rank under torchrun)."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step (per rank)."})
    global_batch_size: Optional[int] = field(
        default=None,
        metadata={
            "help": "Rows per optimizer step over all ranks, whatever their number (batch x ranks x grad-accum): "
            "--grad-accum is derived from it; the loss is the mean over the global batch's tokens."
        },
    )
    seq_len: int = field(default=256, metadata={"help": "Tokens per packed block / row."})
    cayley: Optional[str] = field(
        default=None, metadata={"help": "exact or neumann (default: psoft exact, oft neumann)."}
    )
    neumann_terms: int = field(default=6, metadata={"help": "Cayley-Neumann terms (even keeps R orthogonal)."})
    vectors: bool = field(default=True, metadata={"help": "PSOFT tunable vectors on both sides of R."})
    svd: str = field(default="exact", metadata={"help": "SVD backend when train decomposes itself."})
    init: Optional[str] = field(default=None, metadata={"help": "PSOFT factor init (from the decomposition; psoft)."})
    precision: str = field(
        default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), fp32, bf16 (GPU or CPU), fp16 (GPU)."}
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda."})
    grad_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    warmup: float = field(default=0.05, metadata={"help": "Warmup as a fraction of the steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: off)."})
    save_every: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: only at the end)."})
    eval_every: int = field(default=0, metadata={"help": "Eval loss every N steps (0: only at the end)."})
    log_every: int = field(
        default=10,
        metadata={
            "help": "Measure the rotations' orthogonality error every N steps (every step's loss is logged anyway)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of data order, dropout and heads."})
    quantize: Optional[str] = field(
        default=None,
        metadata={
            "help": "Load the frozen base quantized with bitsandbytes (nf4) and train OFT or PSOFT over it (QOFT); "
            "PSOFT's subspace comes from the original float weights."
        },
    )
    fsdp: bool = field(
        default=False,
        metadata={
            "help": "Under torchrun: shard the frozen base across the ranks with FSDP2 (the adapter stays whole on "
            "each rank), for a base larger than one device's memory."
        },
    )

    def __post_init__(self) -> None:
        checks = [
            (self.method in ("psoft", "oft"), f"method must be psoft or oft, got {self.method!r}"),
            (
                self.rank is None or (_is_int(self.rank) and self.rank > 0),
                f"--rank must be a positive integer, got {self.rank}",
            ),
            (
                self.alpha is None or (math.isfinite(self.alpha) and self.alpha > 0),
                f"--alpha must be a positive number, got {self.alpha}",
            ),
            (self.steps is None or (_is_int(self.steps) and self.steps > 0), f"--steps must be > 0, got {self.steps}"),
            (
                self.epochs is None or (math.isfinite(self.epochs) and 0 < self.epochs <= 1e6),
                f"--epochs must be a number in (0, 1e6], got {self.epochs}",
            ),
            (
                self.lr is None or (self.lr > 0 and math.isfinite(self.lr)),
                f"--lr must be a positive number, got {self.lr}",
            ),
            (self.batch_size > 0, f"--batch-size must be > 0, got {self.batch_size}"),
            (self.grad_accum > 0, f"--grad-accum must be > 0, got {self.grad_accum}"),
            (
                self.global_batch_size is None or (_is_int(self.global_batch_size) and self.global_batch_size > 0),
                f"--global-batch-size must be > 0, got {self.global_batch_size}",
            ),
            (self.seq_len >= 2, f"--seq-len must be >= 2, got {self.seq_len}"),
            (self.svd in SVD_CHOICES, f"--svd must be one of {', '.join(SVD_CHOICES)}, got {self.svd!r}"),
            (
                self.precision in ("auto", "fp32", "bf16", "fp16"),
                f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}",
            ),
            (0 <= self.warmup < 1, f"--warmup must be a fraction in [0, 1), got {self.warmup}"),
            (
                math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0,
                f"--max-grad-norm must be >= 0 (0: no clipping), got {self.max_grad_norm}",
            ),
            (
                math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                f"--weight-decay must be >= 0, got {self.weight_decay}",
            ),
            (self.save_every >= 0 and self.eval_every >= 0, "--save-every and --eval-every must be >= 0"),
            (self.log_every > 0, f"--log-every must be > 0, got {self.log_every}"),
            (_is_int(self.seed) and 0 <= self.seed < 2**63, f"--seed must be an integer in [0, 2^63), got {self.seed}"),
            (
                self.quantize in (None,) + QUANTIZE_CHOICES,
                f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize!r}",
            ),
            (
                not (self.fsdp and self.quantize),
                f"--fsdp with --quantize {self.quantize}: FSDP2 shards float parameters and bitsandbytes' 4-bit "
                "weights are not ones; drop --quantize (FSDP shards the float base) or --fsdp",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserInputError(message)

    @property
    def peak_lr(self) -> float:
        """The learning rate the run uses: ``--lr`` or the method's measured default."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def resolved(
        self, rank: Optional[int] = None, alpha: Optional[float] = None, init: Optional[str] = None
    ) -> "TrainConfig":
        """A copy with every default filled in (``rank``, ``alpha``, ``init`` from a decomposition when given)."""
        rank = self.rank or rank or DEFAULT_RANK
        return replace(
            self,
            rank=rank,
            alpha=float(self.alpha or alpha or rank),
            lr=self.peak_lr,
            init=self.init or init or "psoft",
        )

    def for_world(self, ranks: int) -> "TrainConfig":
        """The config on ``ranks`` processes: with ``--global-batch-size`` G, the per-rank micro-batch is
        ``--batch-size`` (or G / ranks when smaller) and ``--grad-accum`` is what makes G = batch x ranks x accum.
        ``--fsdp`` needs 2 ranks or more."""
        if self.fsdp and ranks < 2:
            raise UserInputError(
                "--fsdp shards the base across the ranks of a torchrun launch and this is one process: launch "
                "with torchrun --nproc_per_node N (N >= 2), or drop --fsdp"
            )
        if self.global_batch_size is None:
            return self
        total = self.global_batch_size
        if total % ranks:
            raise UserInputError(
                f"--global-batch-size {total} is not divisible by the {ranks} ranks: use a multiple "
                f"of {ranks}, or launch a number of ranks that divides {total}"
            )
        per_rank = total // ranks
        batch = min(self.batch_size, per_rank)
        if per_rank % batch:
            raise UserInputError(
                f"--global-batch-size {total} on {ranks} rank(s) is {per_rank} rows per rank, not a "
                f"multiple of --batch-size {batch}: use a --batch-size that divides {per_rank}"
            )
        if self.grad_accum not in (1, per_rank // batch):
            raise UserInputError(
                f"--grad-accum {self.grad_accum} contradicts --global-batch-size {total} (which "
                f"makes it {per_rank // batch} with --batch-size {batch} on {ranks} rank(s)): drop "
                "--grad-accum"
            )
        return replace(self, batch_size=batch, grad_accum=per_rank // batch)

    def method_config(self):
        from psoft_export.adapters import OftConfig, PsoftConfig

        if self.method == "psoft":
            rank = self.rank or DEFAULT_RANK
            return PsoftConfig(
                rank=rank,
                alpha=float(self.alpha or rank),
                svd=self.svd,
                init=self.init or "psoft",
                cayley=self.cayley or "exact",
                neumann_terms=self.neumann_terms,
                vector_a=self.vectors,
                vector_b=self.vectors,
            )
        return OftConfig(block_size=self.block_size, cayley=self.cayley or "neumann", neumann_terms=self.neumann_terms)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warmup over ``warmup * total`` steps, then cosine decay to 0 at ``total``."""
    warm = int(warmup * total)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
