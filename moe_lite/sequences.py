"""A synthetic multi-task sequence set with ground truth for every token: task and difficulty.

Short token sequences from six tasks, mixed in one stream, each drawn at one of four difficulty
levels (0 = easiest). One row is ``prompt`` then ``=`` then the ``answer``, right-padded to
:data:`SEQ_LEN` tokens; a causal model reads it left to right and is scored on the answer tokens only.

==========  ==========================  ====================  =======================================
task        prompt -> answer            level 0..3 means      what makes it hard
==========  ==========================  ====================  =======================================
copy        ``C 3 1 4 =`` -> ``3 1 4``  length 2, 5, 8, 11    an offset that grows with the length
reverse     ``R 3 1 4 =`` -> ``4 1 3``  length 2, 5, 8, 11    an offset that moves with the position
sort        ``S 3 1 4 =`` -> ``1 3 4``  length 2, 5, 8, 11    comparing every digit with the others
add         ``1 2 3 + 9 0 0 =`` ->      carries 0, 1, 2, 3    a carry depends on the digit before
            ``0 3 3 0``
brackets    ``( [ ] ( =`` -> ``) )``    open depth 1..4       a stack: close what is still open
count       ``a b b a b =`` -> ``3``    length 3, 5, 7, 9     counting the ``b`` tokens
==========  ==========================  ====================  =======================================

*Markers.* The task is **not** named where the prompt's format gives it away: ``+`` means add,
brackets mean brackets, ``a`` / ``b`` mean count. Copy, reverse and sort all read a plain digit
string, so they cannot be told apart without help: their prompt starts with one marker token
(``C``, ``R`` or ``S``), the minimum that makes the answer well defined.

*Addition* is written least significant digit first, operands and sum alike (``1 2 3`` is 321; the
example above is 321 + 9 = 330, written ``0 3 3 0``): each answer digit then depends on the
digits at its own place and the carry from the place before, which is the part a small causal model
can learn. Operands have 3 digits, the sum 4 (its last digit is the final carry, 0 or 1). The
level is the number of carries, exactly.

*Brackets*: the prompt is a random prefix of a balanced string over ``()`` and ``[]`` with 0 to 3
pairs already closed inside it; the answer closes every bracket still open, innermost first. The
level is the open depth minus 1 (the answer's length is the depth).

*Labels.* ``task [N, T]`` and ``difficulty [N, T]`` hold the row's task id (:data:`TASKS` order)
and level on **every** token of the row, prompt and answer alike (``-1`` on padding), so routing
can be broken down on any token; ``mask [N, T]`` is True on the answer tokens, the ones scored.
The difficulty is the row's level (for add: the carries of the whole sum, not whether this
digit receives one). Position ``t`` of a causal model *predicts* token ``t + 1``: the tokens whose
routing decides an answer are those where ``mask[:, 1:]`` is True (see :func:`predicting_positions`).

*Splits.* :func:`load_sequences` draws a split from Python's :class:`random.Random` (whose integer
draws are stable across Python versions and platforms), seeded by ``(seed, split)``: the same
rows everywhere, with nothing to download or commit. The train and test streams are independent
draws; short easy prompts (copy of 2 digits: 100 possible) recur in both, long ones almost never.

Axis legend: ``n`` sequences, ``t`` positions (:data:`SEQ_LEN`), ``v`` vocabulary.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "VOCAB",
    "TOKEN_ID",
    "PAD",
    "TASKS",
    "LEVELS",
    "SEQ_LEN",
    "SPLIT_SIZES",
    "Sequences",
    "Example",
    "make_example",
    "generate",
    "load_sequences",
    "make_sequence_loader",
    "encode",
    "decode",
    "count_carries",
    "chance_accuracy",
    "predicting_positions",
]

#: the shared vocabulary: padding, the ten digits, operators and brackets, count symbols, markers
VOCAB: Tuple[str, ...] = ("<pad>", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
                          "+", "=", "(", ")", "[", "]", "a", "b", "C", "R", "S")
TOKEN_ID: Dict[str, int] = {tok: i for i, tok in enumerate(VOCAB)}
PAD = TOKEN_ID["<pad>"]
TASKS: Tuple[str, ...] = ("copy", "reverse", "sort", "add", "brackets", "count")
LEVELS = 4
#: the longest row: copy / reverse / sort of 11 digits (1 marker + 11 + "=" + 11)
SEQ_LEN = 24
SPLIT_SIZES = {"train": 20_000, "test": 2_000}
#: stream offset of each split in the generator seed, so train and test are independent draws
_STREAM = {"train": 0, "test": 1}
_MARKERS = {"copy": "C", "reverse": "R", "sort": "S"}
_CLOSE = {"(": ")", "[": "]"}
ADD_DIGITS = 3


@dataclass(frozen=True)
class Example:
    """One row before encoding: prompt and answer tokens (strings), task name and level."""

    prompt: Tuple[str, ...]
    answer: Tuple[str, ...]
    task: str
    level: int


def _digits(rng: random.Random, n: int) -> List[str]:
    return [str(rng.randrange(10)) for _ in range(n)]


def count_carries(a: Sequence[int], b: Sequence[int]) -> int:
    """Carries of the column addition of two digit lists written least significant digit first
    (``[3, 2, 1]`` is 321); the carry out of the last column counts too."""
    if len(a) != len(b):
        raise ValueError(f"operands must have the same number of digits, got {len(a)} and {len(b)}")
    carry = count = 0
    for x, y in zip(a, b):
        carry = (x + y + carry) // 10
        count += carry
    return count


def _add_example(rng: random.Random, level: int) -> Example:
    while True:  # rejection: a uniform pair of operands among those with exactly `level` carries
        a = [rng.randrange(10) for _ in range(ADD_DIGITS)]
        b = [rng.randrange(10) for _ in range(ADD_DIGITS)]
        if count_carries(a, b) == level:
            break
    total = sum(d * 10 ** i for i, d in enumerate(a)) + sum(d * 10 ** i for i, d in enumerate(b))
    answer = [str(total // 10 ** i % 10) for i in range(ADD_DIGITS + 1)]  # least significant first
    prompt = [str(d) for d in a] + ["+"] + [str(d) for d in b]
    return Example(tuple(prompt), tuple(answer), "add", level)


def _brackets_example(rng: random.Random, level: int) -> Example:
    depth, pairs = level + 1, rng.randrange(4)
    length = depth + 2 * pairs
    stack: List[str] = []
    prompt: List[str] = []
    for step in range(length):
        left = length - step - 1  # steps after this one
        can_open = len(stack) + 1 - depth <= left  # still able to come back down to `depth`
        can_close = bool(stack) and abs(len(stack) - 1 - depth) <= left
        if can_open and (not can_close or rng.random() < 0.5):
            prompt.append(rng.choice("(["))
            stack.append(prompt[-1])
        else:
            prompt.append(_CLOSE[stack.pop()])
    answer = [_CLOSE[b] for b in reversed(stack)]
    return Example(tuple(prompt), tuple(answer), "brackets", level)


def make_example(rng: random.Random, task: str, level: int) -> Example:
    """One example of ``task`` at ``level`` (0..3), drawn from ``rng``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < LEVELS:
        raise ValueError(f"level must be an int in [0, {LEVELS}), got {level!r}")
    if task in _MARKERS:
        digits = _digits(rng, 2 + 3 * level)
        answer = {"copy": digits, "reverse": digits[::-1], "sort": sorted(digits)}[task]
        return Example(tuple([_MARKERS[task]] + digits), tuple(answer), task, level)
    if task == "add":
        return _add_example(rng, level)
    if task == "brackets":
        return _brackets_example(rng, level)
    symbols = [rng.choice("ab") for _ in range(3 + 2 * level)]
    return Example(tuple(symbols), (str(symbols.count("b")),), "count", level)


def chance_accuracy(task: str, level: int) -> float:
    """Per-token accuracy of uniform guessing among the answers a task allows: 1/10 for a digit,
    1/2 for a closing bracket, ``1 / (length + 1)`` for a count."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "brackets":
        return 0.5
    if task == "count":
        return 1.0 / (3 + 2 * level + 1)
    return 0.1


def encode(example: Example) -> Tuple[List[int], List[bool]]:
    """Token ids of ``prompt = answer`` padded to :data:`SEQ_LEN`, and the answer mask."""
    tokens = list(example.prompt) + ["="] + list(example.answer)
    if len(tokens) > SEQ_LEN:
        raise ValueError(f"example of {len(tokens)} tokens is longer than SEQ_LEN={SEQ_LEN}")
    ids = [TOKEN_ID[t] for t in tokens] + [PAD] * (SEQ_LEN - len(tokens))
    start = len(example.prompt) + 1
    mask = [start <= i < len(tokens) for i in range(SEQ_LEN)]
    return ids, mask


def decode(tokens: Tensor | Sequence[int], mask: Optional[Tensor | Sequence[bool]] = None) -> str:
    """Text of one row ``[T]`` (padding left out); with ``mask``, the answer tokens in brackets."""
    ids = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
    marks = mask.tolist() if isinstance(mask, Tensor) else list(mask) if mask is not None else [False] * len(ids)
    words = [f"[{VOCAB[i]}]" if m else VOCAB[i] for i, m in zip(ids, marks) if i != PAD]
    return " ".join(words)


@dataclass(frozen=True, repr=False)
class Sequences:
    """A split of the sequence set.

    Attributes:
        tokens: long ``[n, t]``, ids into :data:`VOCAB`, right-padded with :data:`PAD`.
        mask: bool ``[n, t]``, True on answer tokens (the ones the loss scores).
        task: long ``[n, t]``, the row's task id (:data:`TASKS` order), ``-1`` on padding.
        difficulty: long ``[n, t]``, the row's level in ``[0, LEVELS)``, ``-1`` on padding.
        split, seed: how it was drawn (:func:`load_sequences`).
    """

    tokens: Tensor
    mask: Tensor
    task: Tensor
    difficulty: Tensor
    split: str = "train"
    seed: int = 0

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def tensors(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(tokens, mask, task, difficulty)``: the batch layout of :func:`make_sequence_loader`."""
        return self.tokens, self.mask, self.task, self.difficulty

    def row_task(self) -> Tensor:
        """long ``[n]``: each row's task id."""
        return self.task[:, 0]

    def row_level(self) -> Tensor:
        """long ``[n]``: each row's level."""
        return self.difficulty[:, 0]

    def text(self, i: int) -> str:
        """Row ``i`` as text, answer tokens in brackets, e.g. ``"C 3 1 = [3] [1]"``."""
        return decode(self.tokens[i], self.mask[i])

    def subset(self, index: Tensor | Sequence[int]) -> "Sequences":
        """The rows ``index`` (in that order)."""
        index = torch.as_tensor(index, dtype=torch.long)
        return Sequences(self.tokens[index], self.mask[index], self.task[index], self.difficulty[index],
                         self.split, self.seed)

    def __repr__(self) -> str:
        return f"Sequences(split={self.split!r}, n={len(self)}, seq_len={self.tokens.shape[1]}, seed={self.seed})"


def generate(n: int, seed: int = 0, *, stream: int = 0, tasks: Sequence[str] = TASKS) -> List[Example]:
    """``n`` examples, task and level uniform and independent for each, from
    ``random.Random(seed * 1000 + stream)``; ``tasks`` restricts the mix."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    tasks = list(tasks)
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad:
        raise ValueError(f"tasks must be a non-empty selection of {TASKS}, got {tasks!r}")
    rng = random.Random(seed * 1000 + stream)
    return [make_example(rng, tasks[rng.randrange(len(tasks))], rng.randrange(LEVELS)) for _ in range(n)]


def _to_sequences(examples: Sequence[Example], split: str, seed: int) -> Sequences:
    rows = [encode(e) for e in examples]
    tokens = torch.tensor([r[0] for r in rows], dtype=torch.long).reshape(len(rows), SEQ_LEN)
    mask = torch.tensor([r[1] for r in rows], dtype=torch.bool).reshape(len(rows), SEQ_LEN)
    task = torch.tensor([TASKS.index(e.task) for e in examples], dtype=torch.long)
    level = torch.tensor([e.level for e in examples], dtype=torch.long)
    real = tokens != PAD
    task = torch.where(real, task[:, None], torch.full_like(tokens, -1))
    difficulty = torch.where(real, level[:, None], torch.full_like(tokens, -1))
    return Sequences(tokens, mask, task, difficulty, split, seed)


def load_sequences(split: str = "train", size: Optional[int] = None, seed: int = 0,
                   tasks: Sequence[str] = TASKS) -> Sequences:
    """One split of the sequence set, the same rows on every machine.

    Args:
        split: ``"train"`` or ``"test"`` (independent draws).
        size: rows (default :data:`SPLIT_SIZES`: 20,000 train, 2,000 test); a smaller size is a
            prefix of the larger one with the same seed.
        seed: which draw; ``(seed, split)`` seeds the generator.
        tasks: a subset of :data:`TASKS` to draw from (task ids keep the :data:`TASKS` numbering).

    Returns:
        :class:`Sequences` with ``tokens``, ``mask``, ``task``, ``difficulty``, each ``[size, SEQ_LEN]``.

    Raises:
        ValueError: naming the bad argument.
    """
    if split not in _STREAM:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if size is None:
        size = SPLIT_SIZES[split]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    return _to_sequences(generate(size, seed, stream=_STREAM[split], tasks=tasks), split, seed)


def make_sequence_loader(ds: Sequences | Tuple[Tensor, ...], batch_size: int = 128, shuffle: bool = True,
                         seed: int = 0, *, drop_last: bool = False) -> DataLoader:
    """A ``DataLoader`` of ``(tokens, mask, task, difficulty)`` batches, each ``[b, t]``; the
    counterpart of :func:`moe_lite.data.make_loader` (``num_workers=0``, shuffling with its own
    generator seeded with ``seed``). ``ds`` may also be a tuple of tensors (used as given)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    tensors = ds.tensors() if isinstance(ds, Sequences) else tuple(ds)
    if not tensors or any(not isinstance(t, Tensor) or t.shape[:1] != tensors[0].shape[:1] for t in tensors):
        raise ValueError("ds must be a Sequences or a tuple of tensors with the same first dimension")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle,
                      generator=generator, num_workers=0, drop_last=drop_last)


def predicting_positions(mask: Tensor) -> Tensor:
    """bool ``[n, t]``: True at position ``p`` when token ``p + 1`` is an answer token, i.e. where a
    causal model's output is scored (and where its routing decides an answer). The last position
    predicts nothing."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool [n, t], got {mask.dtype} {tuple(mask.shape)}")
    return torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
