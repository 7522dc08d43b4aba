"""Golden records of every export route: what each format writes (structure) and computes (outputs).

``fixtures/golden/`` holds, for each fixture case, a seeded adapter (``adapters/<case>/``, stored, small) and for
each route (format x merged/split) ``<case>/<format>-<merged|split>.json``::

    {"case": ..., "route": ..., "structure": {"<file> tensor <name> dtype": "F32", ...},
     "outputs": {"logits": {"shape": [...], "max_abs": ..., "mean_abs": ..., "head": [[...16 values...], ...]}}}

``structure`` is a flat, sorted map from a readable key (file, then what: safetensors tensor dtype/shape, ONNX
opset/inputs/outputs/overridable initializers/adapter parameters, GGUF metadata keys and tensor types/shapes) to
its value; it is compared exactly. ``outputs`` summarises the export's main output on the fixed inputs
(``verify.fixed_inputs``) over the real positions: its shape, max and mean |x|, and the first ``HEAD`` entries of
the last axis at every position, 7 significant digits; compared within the route's ``GOLDEN_TOLERANCES`` relative
to the output scale (``max |got - golden| / max |golden|``).

Regenerate on purpose (prints what changed, so an intended change is one reviewed commit)::

    python -m tests.golden --regenerate            # goldens only, from the stored adapters
    python -m tests.golden --regenerate --adapters # rebuild the seeded adapters too
    python -m tests.golden --check                 # compare only; exit 1 on drift

``tests/test_golden.py`` re-exports every route from the stored adapter and compares it with its golden.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from converters import FORMATS

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "fixtures" / "models"
DATA = ROOT / "fixtures" / "data"
GOLDEN = ROOT / "fixtures" / "golden"
ADAPTERS = GOLDEN / "adapters"
HEAD = 16  # entries of the last axis kept per position
DIGITS = 7  # significant digits of stored floats
SEED = 0
RANDOM_STD = 0.2  # generator entries: moves the outputs far beyond every tolerance (see tests/test_merge.py)


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    options: dict  # TrainConfig fields; PSOFT alpha != rank, so a LoRA scaling (alpha / r) that an exporter
    # dropped or applied twice changes the outputs (with alpha == r the scaling is 1 and such a bug is invisible)
    data: str


CASES = {
    c.name: c
    for c in (
        Case("llama-psoft", "llama", dict(method="psoft", rank=8, alpha=16.0), "train.jsonl"),
        Case("qwen2-psoft", "qwen2", dict(method="psoft", rank=8, alpha=4.0, cayley="neumann"), "train.jsonl"),
        Case("llama-oft", "llama", dict(method="oft", block_size=16), "train.jsonl"),
        Case("gpt2-psoft", "gpt2", dict(method="psoft", rank=8, alpha=16.0), "train.jsonl"),
        Case("bert-psoft", "bert", dict(method="psoft", rank=8, alpha=16.0), "classify.jsonl"),
    )
}

ALL_ROUTES = [(to, split) for to in FORMATS for split in (False, True)]  # every format of converters.FORMATS
# Not every route exists: GGUF is for llama/qwen2 (and OFT's full-rank update has no exact LoRA-only form, so no
# GGUF split without --lora-rank); a classification adapter's new head cannot ride an ONNX split export.
EXCLUDED = {
    ("llama-oft", "gguf", True),
    ("gpt2-psoft", "gguf", False),
    ("gpt2-psoft", "gguf", True),
    ("bert-psoft", "gguf", False),
    ("bert-psoft", "gguf", True),
    ("bert-psoft", "onnx", True),
}
ROUTES = [(case, to, split) for case in CASES for to, split in ALL_ROUTES if (case, to, split) not in EXCLUDED]


def randomize(model: "torch.nn.Module", seed: int = 0, std: float = 0.1) -> None:
    """Seeded adapter parameters that move the outputs well beyond any tolerance (generators ~ N(0, std),
    vectors 1 + N(0, 0.1)): what goldens and tests export, so a dropped adapter cannot pass."""
    import torch

    from psoft_export.adapters import adapter_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.q.normal_(0.0, std, generator=g)
            for vec in (getattr(layer, "vector_a", None), getattr(layer, "vector_b", None)):
                if vec is not None:
                    vec.add_(0.1 * torch.randn(vec.shape, generator=g))


def route_name(to: str, split: bool) -> str:
    return f"{to}-{'split' if split else 'merged'}"


def label(case: str, to: str, split: bool) -> str:
    """``gguf merged llama-psoft``: how messages name a route."""
    return f"{to} {'split' if split else 'merged'} {case}"


def golden_path(case: str, to: str, split: bool) -> Path:
    return GOLDEN / case / f"{route_name(to, split)}.json"


# The goldens' own bars, fixed here rather than imported from verify, so loosening verify cannot loosen them.
GOLDEN_TOLERANCES = {"safetensors": 1e-4, "onnx": 1e-4, "gguf": 2e-3}


def tolerance(to: str, dtype: str = "float32") -> float:
    if dtype != "float32":
        raise KeyError(f"goldens are float32 only, not {dtype}")
    return GOLDEN_TOLERANCES[to]


# ------------------------------------------------------------------------------------------ seeded adapters


def build_adapter(case: Case, out: Path) -> None:
    """A deterministic adapter for ``case`` in ``out``: decompose (rank 8, no plot), one training step (for a
    classifier's head), then every generator and vector drawn from a seeded generator; only the adapter files
    and the decomposition are kept."""

    from psoft_export import adapter_io
    from psoft_export.decomposition import MANIFEST_FILE, decompose
    from psoft_export.models import reference_model
    from psoft_export.train import TrainConfig, train

    model_dir = MODELS / case.model
    cfg = TrainConfig(**{"seq_len": 64, "batch_size": 8, "log_every": 5, "steps": 1, "seed": SEED, **case.options})
    with tempfile.TemporaryDirectory(prefix="psoft-golden-") as scratch:
        scratch = Path(scratch)
        decomposition = None
        if cfg.method == "psoft":
            decomposition = decompose(
                model_dir, scratch / "decomposition", cfg.rank, svd=cfg.svd, alpha=cfg.alpha, seed=SEED, plot=False
            ).path
        trained = scratch / "trained"
        train(model_dir, DATA / case.data, trained, cfg, decomposition=decomposition)
        model, kind, classes = reference_model(model_dir, trained)
        randomize(model, SEED, RANDOM_STD)
        heads = json.loads((trained / adapter_io.META_FILE).read_text())["heads"]
        adapter_io.save_adapter(
            trained,
            model,
            cfg.method_config(),
            base_model=f"fixtures/models/{case.model}",
            task="classify" if kind == "classify" else "causal",
            classes=classes,
            heads=heads,
        )
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for name in (adapter_io.CONFIG_FILE, adapter_io.WEIGHTS_FILE, adapter_io.META_FILE, adapter_io.OURS_FILE):
            shutil.copy2(trained / name, out / name)
        if (trained / adapter_io.DECOMPOSITION_DIR).is_dir():
            dest = out / adapter_io.DECOMPOSITION_DIR
            shutil.copytree(trained / adapter_io.DECOMPOSITION_DIR, dest, ignore=shutil.ignore_patterns("*.png"))
            manifest = json.loads((dest / MANIFEST_FILE).read_text())
            manifest["source_model"] = f"fixtures/models/{case.model}"  # no machine path in a stored file
            (dest / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ structure


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def _files(root: Path) -> list[str]:
    """The export's files; the ``.psoft-export`` ownership marker is bookkeeping, not part of the export."""
    from psoft_export.atomic import MARKER

    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MARKER)


def _json_keys(path: Path, keys: tuple[str, ...]) -> dict:
    data = json.loads(path.read_text())
    return {k: data[k] for k in keys if k in data}


def structure(export_dir: Path, to: str) -> dict[str, Any]:
    """The flat structure record of an export directory (see the module docstring)."""
    export_dir = Path(export_dir)
    out: dict[str, Any] = {"files": _files(export_dir)}
    if to == "safetensors":
        for rel in out["files"]:
            path = export_dir / rel
            if rel.endswith(".safetensors"):
                header = _safetensors_header(path)
                for k, v in sorted(header.pop("__metadata__", {}).items()):
                    out[f"{rel} metadata {k}"] = v
                for name, info in sorted(header.items()):
                    out[f"{rel} tensor {name} dtype"] = info["dtype"]
                    out[f"{rel} tensor {name} shape"] = info["shape"]
            elif path.name == "config.json":
                for k, v in _json_keys(
                    path, ("architectures", "model_type", "dtype", "torch_dtype", "num_labels", "id2label")
                ).items():
                    out[f"{rel} config {k}"] = v
            elif rel == "lora/adapter_config.json":
                for k, v in json.loads(path.read_text()).items():
                    if k != "base_model_name_or_path":  # a machine path
                        out[f"{rel} config {k}"] = v
    elif to == "onnx":
        from converters import onnx as conv

        d = conv.describe(export_dir)
        for domain, version in sorted(d["opset"].items()):
            out[f"model.onnx opset {domain}"] = version
        for what in ("inputs", "outputs", "overridable"):
            for v in d[what]:
                for k in ("dtype", "shape", "default_shape"):
                    if k in v:
                        out[f"model.onnx {what[:-1] if what != 'overridable' else what} {v['name']} {k}"] = v[k]
        for name, a in d["adapters"].items():
            out[f"{name} adapter_version"] = a["adapter_version"]
            out[f"{name} model_version"] = a["model_version"]
            for p, info in a["parameters"].items():
                out[f"{name} parameter {p} dtype"] = info["dtype"]
                out[f"{name} parameter {p} shape"] = info["shape"]
    elif to == "gguf":
        from converters import gguf as conv

        for rel in out["files"]:
            if not rel.endswith(".gguf"):
                continue
            d = conv.describe(export_dir / rel)
            for k, v in d["metadata"].items():
                out[f"{rel} key {k}"] = v
            out[f"{rel} tensor order"] = [t["name"] for t in d["tensors"]]
            for t in d["tensors"]:
                out[f"{rel} tensor {t['name']} type"] = t["type"]
                out[f"{rel} tensor {t['name']} ne"] = t["ne"]
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------------ outputs


def _round(x: float) -> float:
    return float(f"{x:.{DIGITS}g}")


def summarize(array) -> dict:
    """Compact yet sensitive: shape, max/mean |x| and the first ``HEAD`` entries of the last axis per position."""
    import numpy as np

    a = np.asarray(array, np.float64)
    flat = a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a.reshape(1, -1)
    return {
        "shape": list(a.shape),
        "max_abs": _round(float(np.abs(a).max())),
        "mean_abs": _round(float(np.abs(a).mean())),
        "head": [[_round(float(v)) for v in row[:HEAD]] for row in flat],
    }


def run_outputs(export_dir: Path, model_dir: Path) -> dict[str, dict]:
    """Run the export in its runtime on the fixed inputs; summaries of its main output(s) over real positions."""
    from psoft_export.models import fixed_inputs
    from psoft_export.models import masked as _masked
    from psoft_export.verification import RUNTIMES, read_export

    info = read_export(export_dir)
    kind = info["kind"]
    inputs = fixed_inputs(model_dir)
    mask = inputs["attention_mask"].numpy()
    got = RUNTIMES[info["to"]](Path(export_dir), info, inputs, kind, model_dir)
    name = "logits" if kind != "encoder" else "last_hidden_state"
    return {name + lbl: summarize(_masked(arr, mask, kind)) for lbl, arr in sorted(got.items())}


def export(case: str, to: str, split: bool, out_dir: Path, verify: bool = False) -> Path:
    """Export ``case``'s stored adapter by route ``to``/``split`` into ``out_dir``.

    Checks run unverified (the golden is the check, so a broken exporter fails with a golden message rather than
    merge's own); ``--regenerate`` verifies against PyTorch, so no golden is ever recorded from a wrong export.
    """
    from psoft_export.merge import merge

    c = CASES[case]
    merge(MODELS / c.model, ADAPTERS / case, out_dir, to, split=split, verify=verify, overwrite=True)
    return Path(out_dir)


def record(case: str, to: str, split: bool, export_dir: Path) -> dict:
    return {
        "case": case,
        "route": route_name(to, split),
        "tolerance": tolerance(to),
        "structure": structure(export_dir, to),
        "outputs": run_outputs(export_dir, MODELS / CASES[case].model),
    }


# ------------------------------------------------------------------------------------------ comparison


def _short(v: Any, limit: int = 120) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _list_diff(key: str, old: list, new: list) -> str:
    if all(isinstance(x, str) for x in old + new):
        removed, added = [x for x in old if x not in new], [x for x in new if x not in old]
        if removed or added:
            return (
                f"{key}:"
                + (f" removed {_short(removed)}" if removed else "")
                + (f" added {_short(added)}" if added else "")
            )
        i = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
        return f"{key}: position {i} {old[i]} -> {new[i]}"
    return f"{key} {_short(old)} -> {_short(new)}"


def structure_diff(old: dict, new: dict) -> list[str]:
    """Readable lines: ``<key> <old> -> <new>``, ``<key> removed (was ...)``, ``<key> added (...)``."""
    lines = []
    for key in sorted(set(old) | set(new)):
        if key not in new:
            lines.append(f"{key} removed (was {_short(old[key])})")
        elif key not in old:
            lines.append(f"{key} added ({_short(new[key])})")
        elif old[key] != new[key]:
            if isinstance(old[key], list) and isinstance(new[key], list) and key.endswith(("files", "order")):
                lines.append(_list_diff(key, old[key], new[key]))
            else:
                lines.append(f"{key} {_short(old[key])} -> {_short(new[key])}")
    return lines


def output_errors(old: dict, new: dict) -> dict[str, Any]:
    """Per output: the relative error ``max |new - old| / max |old|`` over the stored entries and the scale
    statistics, or a string saying why the outputs cannot be compared (missing, other shape)."""
    import numpy as np

    errors: dict[str, Any] = {}
    for name in sorted(set(old) | set(new)):
        if name not in new:
            errors[name] = "missing"
            continue
        if name not in old:
            errors[name] = "new output"
            continue
        o, n = old[name], new[name]
        if o["shape"] != n["shape"]:
            errors[name] = f"shape {o['shape']} -> {n['shape']}"
            continue
        scale = max(o["max_abs"], 1e-30)
        head = float(np.abs(np.asarray(n["head"], np.float64) - np.asarray(o["head"], np.float64)).max())
        stats = max(abs(n["max_abs"] - o["max_abs"]), abs(n["mean_abs"] - o["mean_abs"]))
        errors[name] = max(head, stats) / scale
    return errors


def compare(golden: dict, got: dict, where: str, tol: float) -> list[str]:
    """Every disagreement of ``got`` with ``golden``, one line each, prefixed ``golden drift: <where>:``: structure
    exactly, outputs within ``tol`` (the route's ``verification.TOLERANCES`` entry) relative to the output scale."""
    lines = [f"golden drift: {where}: {d}" for d in structure_diff(golden["structure"], got["structure"])]
    for name, err in output_errors(golden["outputs"], got["outputs"]).items():
        if isinstance(err, str):
            lines.append(f"golden drift: {where}: {name} {err}")
        elif not err <= tol:
            lines.append(
                f"golden drift: {where}: {name} rel err {err:.1e} > {tol:.0e} "
                f"({_worst(golden['outputs'][name], got['outputs'][name])})"
            )
    return lines


def _worst(old: dict, new: dict) -> str:
    """Where the stored entries differ most: ``row 5 [3] 1.234 -> 1.567, max|x| 9.1 -> 9.3``."""
    import numpy as np

    o, n = np.asarray(old["head"], np.float64), np.asarray(new["head"], np.float64)
    row, col = np.unravel_index(int(np.abs(n - o).argmax()), o.shape)
    return (
        f"worst at position {row} [{col}]: {o[row, col]:.6g} -> {n[row, col]:.6g}; "
        f"max|x| {old['max_abs']:.6g} -> {new['max_abs']:.6g}"
    )


def load_golden(case: str, to: str, split: bool) -> Optional[dict]:
    path = golden_path(case, to, split)
    return json.loads(path.read_text()) if path.is_file() else None


def write_golden(case: str, to: str, split: bool, rec: dict) -> None:
    path = golden_path(case, to, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    # one line per structure key / output row: reviewable diffs, small files
    lines = [
        "{",
        f'  "case": {json.dumps(rec["case"])},',
        f'  "route": {json.dumps(rec["route"])},',
        f'  "tolerance": {json.dumps(rec["tolerance"])},',
        '  "structure": {',
    ]
    items = list(rec["structure"].items())
    lines += [
        f"    {json.dumps(k)}: {json.dumps(v)}{',' if i < len(items) - 1 else ''}" for i, (k, v) in enumerate(items)
    ]
    lines += ["  },", '  "outputs": {']
    outs = list(rec["outputs"].items())
    for i, (name, o) in enumerate(outs):
        lines.append(f"    {json.dumps(name)}: {{")
        lines.append(
            f'      "shape": {json.dumps(o["shape"])}, "max_abs": {json.dumps(o["max_abs"])}, '
            f'"mean_abs": {json.dumps(o["mean_abs"])},'
        )
        lines.append('      "head": [')
        rows = o["head"]
        lines += [f"        {json.dumps(r)}{',' if j < len(rows) - 1 else ''}" for j, r in enumerate(rows)]
        lines.append("      ]")
        lines.append("    }" + ("," if i < len(outs) - 1 else ""))
    lines += ["  }", "}"]
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == json.loads(json.dumps(rec)), "golden writer lost information"
    path.write_text(text)


def describe_change(old: Optional[dict], new: dict, where: str) -> list[str]:
    """What regenerating changed for one route (for the regenerate report)."""
    if old is None:
        return [f"{where}: new golden ({len(new['structure'])} structure keys, outputs {', '.join(new['outputs'])})"]
    lines = [f"{where}: {d}" for d in structure_diff(old["structure"], new["structure"])]
    for name, err in output_errors(old["outputs"], new["outputs"]).items():
        if isinstance(err, str):
            lines.append(f"{where}: {name} {err}")
        elif err > 0:
            tol = tolerance(new["route"].split("-")[0])
            lines.append(
                f"{where}: {name} max rel change {err:.1e}"
                + (f" (beyond tolerance {tol:.0e})" if err > tol else " (within tolerance)")
            )
    return lines


# ------------------------------------------------------------------------------------------ the command


def _available(to: str) -> bool:
    if to != "gguf":
        return True
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.golden", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--regenerate", action="store_true", help="rebuild the goldens, write them, print what changed")
    mode.add_argument("--check", action="store_true", help="compare with the goldens without writing; exit 1 on drift")
    parser.add_argument("--adapters", action="store_true", help="with --regenerate: rebuild the seeded adapters too")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="CASE[/ROUTE]",
        help="restrict to a case (llama-psoft) or route (llama-psoft/gguf-split); repeatable",
    )
    args = parser.parse_args(argv)
    if args.adapters and not args.regenerate:
        parser.error("--adapters goes with --regenerate")

    import os
    import warnings

    warnings.filterwarnings("ignore", message="Exporting aten::index")  # torch's ONNX exporter, every decoder
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))

    def wanted(case: str, to: str, split: bool) -> bool:
        return not args.only or any(o in (case, f"{case}/{route_name(to, split)}") for o in args.only)

    routes = [r for r in ROUTES if wanted(*r)]
    if not routes:
        parser.error(f"--only matched nothing; cases: {', '.join(CASES)}")
    start = time.monotonic()
    if args.adapters:
        for case in dict.fromkeys(c for c, _, _ in routes):
            print(f"[adapter] {case}: building the seeded adapter in {ADAPTERS / case}", flush=True)
            build_adapter(CASES[case], ADAPTERS / case)
    from psoft_export.errors import VerificationError

    changes, drift, skipped, refused = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="psoft-golden-") as scratch:
        for i, (case, to, split) in enumerate(routes, 1):
            where = label(case, to, split)
            if not _available(to):
                print(f"[{i}/{len(routes)}] {where}: skipped (llama_cpp is not installed)", flush=True)
                skipped.append(where)
                continue
            t0 = time.monotonic()
            try:
                out = export(case, to, split, Path(scratch) / f"{case}-{route_name(to, split)}", verify=args.regenerate)
            except VerificationError as exc:  # only --regenerate verifies: never record a wrong export
                print(f"[{i}/{len(routes)}] {where}: NOT recorded, the export fails verification: {exc}", flush=True)
                refused.append(where)
                continue
            rec = record(case, to, split, out)
            shutil.rmtree(out, ignore_errors=True)
            old = load_golden(case, to, split)
            if args.regenerate:
                lines = describe_change(old, rec, where)
                if old != rec:
                    write_golden(case, to, split, rec)
                changes += lines
                state = f"{len(lines)} change(s)" if lines else "unchanged"
            else:
                lines = (
                    ["golden drift: " + where + ": no golden (run --regenerate)"]
                    if old is None
                    else compare(old, rec, where, tolerance(to))
                )
                drift += lines
                state = "DRIFT" if lines else "ok"
            print(f"[{i}/{len(routes)}] {where}: {state} ({time.monotonic() - t0:.1f} s)", flush=True)
            for line in lines:
                print(f"    {line}", flush=True)
    took = f"{time.monotonic() - start:.0f} s"
    if args.regenerate:
        print(
            f"\nregenerated {len(routes) - len(skipped) - len(refused)} golden(s) in {took}: "
            + (f"{len(changes)} change(s):" if changes else "nothing changed")
        )
        for line in changes:
            print(f"  {line}")
        if skipped:
            print(f"skipped (no llama_cpp): {', '.join(skipped)}")
        if refused:
            print(f"NOT recorded (export fails verification against PyTorch): {', '.join(refused)}")
        return 1 if refused else 0
    print(
        f"\nchecked {len(routes) - len(skipped)} route(s) in {took}: "
        + (f"{len(drift)} drift(s)" if drift else "all match")
    )
    return 1 if drift else 0


if __name__ == "__main__":
    sys.exit(main())
