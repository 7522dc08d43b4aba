"""Training data: JSONL files validated line by line, tokenized with the model's own tokenizer, and batched.

Three kinds, chosen by the fields of the first record and required of every record:

- ``{"text": ...}``: causal language modelling; texts are joined with EOS and packed into ``seq_len`` blocks.
- ``{"prompt": ..., "completion": ...}``: causal LM with the loss on the completion tokens only (one example per
  row, right-padded, prompt tokens labelled -100).
- ``{"text": ..., "label": ...}``: sequence classification; labels are all integers (class ids) or all strings
  (class names, sorted to ids).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch

from psoft_export.errors import UserInputError

KINDS = {
    "causal": ("text",),
    "completion": ("prompt", "completion"),
    "classify": ("text", "label"),
}
IGNORE = -100


@dataclass
class Dataset:
    """Tokenized examples. ``rows`` are dicts of 1-D LongTensors (``input_ids``, ``labels``)."""

    kind: str
    rows: list[dict[str, torch.Tensor]]
    labels: list = field(default_factory=list)  # classify: the class names (or ids) in id order

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def tokens(self) -> int:
        return sum(int(r["input_ids"].numel()) for r in self.rows)


def read_jsonl(path: str | Path) -> tuple[str, list[dict]]:
    """Read and validate ``path``; return its kind and records. Every problem names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"data file {path} does not exist: pass a JSONL file with --data")
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserInputError(f"{path} is not UTF-8 text: save the data as UTF-8 JSONL") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{path}:{number}: invalid JSON ({exc.msg}): one JSON object per line") from None
        except (ValueError, RecursionError) as exc:  # 5000-digit integers, nesting deeper than Python's stack
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0]
            raise UserInputError(
                f"{path}:{number}: unreadable JSON ({reason}): one flat JSON object per line"
            ) from None
        if not isinstance(record, dict):
            raise UserInputError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    if not records:
        raise UserInputError(f'{path} has no records: add lines like {{"text": "..."}}')
    kind = _kind_of(path, *records[0])
    for number, record in records:
        _check_record(path, number, record, kind)
    _check_labels(path, kind, records)
    return kind, [r for _, r in records]


def _kind_of(path: Path, number: int, record: dict) -> str:
    keys = set(record)
    for kind in ("classify", "completion", "causal"):
        if set(KINDS[kind]) <= keys:
            return kind
    raise UserInputError(
        f'{path}:{number}: a record needs "text", "prompt"+"completion" or "text"+"label"; found {sorted(keys)}'
    )


def _check_record(path: Path, number: int, record: dict, kind: str) -> None:
    for key in KINDS[kind]:
        if key not in record:
            raise UserInputError(f'{path}:{number}: missing field "{key}" (the file\'s first record is {kind} data)')
        if key != "label" and not isinstance(record[key], str):
            raise UserInputError(f'{path}:{number}: field "{key}" must be a string, got {type(record[key]).__name__}')
    if kind != "classify" and "label" in record:
        raise UserInputError(f'{path}:{number}: unexpected "label": the file\'s first record has none')


def _check_labels(path: Path, kind: str, records: list[tuple[int, dict]]) -> None:
    if kind != "classify":
        return
    types = set()
    for number, record in records:
        label = record["label"]
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise UserInputError(f"{path}:{number}: label {label!r} must be an integer class id or a class name string")
        if isinstance(label, int) and label < 0:
            raise UserInputError(f"{path}:{number}: label {label} is negative: class ids start at 0")
        types.add(type(label))
    if len(types) > 1:
        raise UserInputError(f"{path}: labels mix integers and strings: use one or the other")
    if len({r["label"] for _, r in records}) < 2:
        raise UserInputError(f"{path}: every record has the same label: classification needs at least two classes")


def class_names(records: list[dict]) -> list:
    """Class ids in order: integers 0..max, or the sorted distinct names."""
    labels = [r["label"] for r in records]
    if isinstance(labels[0], int):
        distinct = set(labels)
        if min(distinct) < 0 or max(distinct) >= max(2 * len(distinct), 2) + 64:
            raise UserInputError(
                f"integer labels must be class ids 0..K-1, got {len(distinct)} distinct values from "
                f"{min(distinct)} to {max(distinct)}: renumber them or use string labels"
            )
        return list(range(max(labels) + 1))
    return sorted(set(labels))


def tokenize(records: list[dict], kind: str, tokenizer, seq_len: int, classes: Optional[list] = None) -> Dataset:
    """Tokenize ``records`` of ``kind`` for training with blocks/rows of at most ``seq_len`` tokens."""
    if kind == "causal":
        return Dataset(kind, _pack(records, tokenizer, seq_len))
    if kind == "completion":
        return Dataset(kind, [_completion_row(r, tokenizer, seq_len, n) for n, r in enumerate(records, 1)])
    classes = classes if classes is not None else class_names(records)
    index = {c: i for i, c in enumerate(classes)}
    rows = []
    for record in records:
        if record["label"] not in index:
            raise UserInputError(f"label {record['label']!r} is not one of the training classes {classes}")
        ids = tokenizer(record["text"], truncation=True, max_length=seq_len)["input_ids"]
        rows.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(index[record["label"]])})
    return Dataset(kind, rows, classes)


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _pack(records: list[dict], tokenizer, seq_len: int) -> list[dict[str, torch.Tensor]]:
    stream: list[int] = []
    for record in records:
        stream += tokenizer(record["text"], add_special_tokens=True)["input_ids"] + _eos(tokenizer)
    if len(stream) < 2:
        raise UserInputError("the data tokenizes to fewer than 2 tokens: add text")
    blocks = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
    if len(blocks) > 1 and len(blocks[-1]) < 2:
        blocks.pop()
    return [{"input_ids": torch.tensor(b), "labels": torch.tensor(b)} for b in blocks]


def _completion_row(record: dict, tokenizer, seq_len: int, number: int = 0) -> dict[str, torch.Tensor]:
    prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
    completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + _eos(tokenizer)
    ids = (prompt + completion)[:seq_len]
    labels = ([IGNORE] * len(prompt) + completion)[:seq_len]
    if all(label == IGNORE for label in labels[1:]):  # the model shifts labels: position 0 is never predicted
        raise UserInputError(
            f"record {number}: its prompt fills all {seq_len} tokens of --seq-len, so no completion "
            f"token would be trained (the loss would be NaN): raise --seq-len above {len(prompt)} "
            "or shorten the prompt"
        )
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


def collate(rows: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of rows into a batch with an attention mask (padding labelled -100)."""
    width = max(int(r["input_ids"].numel()) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    sequence_labels = rows[0]["labels"].dim() == 0
    labels = torch.stack([r["labels"] for r in rows]) if sequence_labels else torch.full_like(ids, IGNORE)
    for i, row in enumerate(rows):
        n = int(row["input_ids"].numel())
        ids[i, :n], mask[i, :n] = row["input_ids"], 1
        if not sequence_labels:
            labels[i, :n] = row["labels"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(data: Dataset, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The row indices of each batch of ``epoch``: a seeded permutation, so a resumed run sees the same order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(data), generator=g).tolist()
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def iterate(
    data: Dataset, batch_size: int, seed: int, pad_id: int, start: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches, epoch after epoch, starting at global batch index ``start``."""
    per_epoch = len(batches(data, batch_size, seed, 0))
    index = start
    while True:
        epoch, offset = divmod(index, per_epoch)
        for rows in batches(data, batch_size, seed, epoch)[offset:]:
            yield collate([data.rows[i] for i in rows], pad_id)
            index += 1
