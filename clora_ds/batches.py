"""Tokenized examples -> the training stream: packed rows, padded batches, mixtures of sources and the global
batch order over epochs and ranks (a pure function of the data, the seed and the step, so resume is exact).

Packing is padding-free: examples are concatenated into rows of at most max_seq_length tokens with
position_ids restarting at 0 for each example and no attention_mask; attention then runs per sequence
(clora_ds.attention for SDPA, varlen flash-attention) or under transformers' block-diagonal causal mask
(eager), so packed examples cannot attend to each other.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .data import IGNORE_INDEX, loss_token_count
from .errors import DataError

PACKER_VERSION = 1  # part of the packed-rows cache key (clora_ds.plan): bump whenever pack_row_indices changes its output


def pack_row_indices(lengths, max_len: int, seed: int) -> List[List[int]]:
    """Rows of example indices, each row's lengths summing to at most max_len: best-fit decreasing, rows shuffled.

    Examples are taken longest first (equal lengths in a seeded order); each goes into the open row whose free room is
    the smallest that holds it, or opens a row. Rows are then put in a seeded order, so that consecutive rows mix
    lengths. Best-fit decreasing leaves rows at least as full as first-fit over a random order on realistic length
    distributions (tests/test_packing.py, bench/bench_data.py), and costs O(n log n): the sort, then per example a
    bisection over the sorted distinct free-room values and at most one insert into that list (both bounded by its
    max_len + 1 entries, not by n). A pure function of (lengths, max_len, seed). ``lengths``: [n] ints, each in [1, max_len] (tokenize_records truncates to max_len).
    """
    from bisect import bisect_left, insort

    import numpy as np

    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.max() > max_len or lengths.min() < 1):
        bad = int(np.flatnonzero((lengths > max_len) | (lengths < 1))[0])
        raise ValueError(f"example {bad} has {lengths[bad]} tokens; packing into rows of {max_len} needs lengths in "
                         f"[1, {max_len}] (truncate to max_seq_length first, as tokenize_records does)")
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(len(lengths), generator=generator).numpy()
    order = shuffled[np.argsort(-lengths[shuffled], kind="stable")].tolist()  # longest first, ties in seeded order
    sizes = lengths.tolist()
    rows: List[List[int]] = []
    free_rooms: List[int] = []          # sorted distinct free-room values of the open rows
    rows_by_room: Dict[int, List[int]] = {}  # free room -> open rows with exactly that room (a stack)
    for i in order:
        need = sizes[i]
        j = bisect_left(free_rooms, need)
        if j == len(free_rooms):
            r, left = len(rows), max_len - need
            rows.append([i])
        else:
            room = free_rooms[j]
            stack = rows_by_room[room]
            r, left = stack.pop(), room - need
            if not stack:
                del free_rooms[j], rows_by_room[room]
            rows[r].append(i)
        if left:  # a full row is closed
            stack = rows_by_room.get(left)
            if stack is None:
                rows_by_room[left] = [r]
                insort(free_rooms, left)
            else:
                stack.append(r)
    return [rows[r] for r in torch.randperm(len(rows), generator=generator).tolist()]


def pack_examples(examples: List[Dict[str, list]], max_len: int, seed: int) -> List[List[Dict[str, list]]]:
    """Examples packed into rows of at most max_len tokens (``pack_row_indices``; deterministic by seed)."""
    rows = pack_row_indices([len(ex["input_ids"]) for ex in examples], max_len, seed)
    return [[examples[i] for i in row] for row in rows]


def _right_pad(rows_ids: List[List[int]], rows_labels: List[List[int]], pad_id: int):
    """input_ids (pad_id) and labels (IGNORE_INDEX) [B, T], right-padded to the longest row."""
    longest = max(map(len, rows_ids))
    ids = torch.full((len(rows_ids), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows_ids), longest), IGNORE_INDEX, dtype=torch.long)
    for b, (row_ids, row_labels) in enumerate(zip(rows_ids, rows_labels)):
        ids[b, :len(row_ids)] = torch.tensor(row_ids)
        labels[b, :len(row_labels)] = torch.tensor(row_labels)
    return ids, labels


def collate_packed(rows: List[List[Dict[str, list]]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Padding-free packed batch: input_ids/labels/position_ids [B, T], no attention_mask."""
    ids, labels = _right_pad([[t for ex in row for t in ex["input_ids"]] for row in rows],
                             [[t for ex in row for t in ex["labels"]] for row in rows], pad_id)
    # positions restart per example; trailing pad continues the last example's positions so it cannot
    # look like a new sequence start
    pos = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        t = 0
        for ex in row:
            n = len(ex["input_ids"])
            pos[b, t:t + n] = torch.arange(n)
            t += n
        if t < ids.shape[1]:
            pos[b, t:] = torch.arange(pos[b, t - 1] + 1, pos[b, t - 1] + 1 + ids.shape[1] - t)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def pad_batch(examples: List[Dict[str, list]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-padded batch: input_ids/labels/attention_mask [B, T]."""
    ids, labels = _right_pad([e["input_ids"] for e in examples], [e["labels"] for e in examples], pad_id)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        mask[i, :len(e["input_ids"])] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class Mixture:
    """Each epoch's training units drawn from several tokenized sources in fixed proportions (--train_weights).

    Epoch e has N = Σ_i |source_i| examples: n_i ≈ w_i·N from source i (largest remainder, so Σ n_i = N), drawn without
    replacement, after ⌊n_i / |source_i|⌋ whole passes when n_i exceeds the source (upsampling). The draw is a pure
    function of (seed, epoch); with ``pack_len`` the epoch's draw is packed, ``pack_examples(draw, pack_len, seed + e)``,
    so rows mix sources and their number may differ a little from epoch to epoch.
    """

    def __init__(self, sources: List[List[Dict[str, list]]], weights: Sequence[float], seed: int,
                 pack_len: Optional[int] = None):
        total = float(sum(weights))
        self.sources, self.weights = sources, [w / total for w in weights]
        self.seed, self.pack_len = seed, pack_len
        n = sum(map(len, sources))
        quotas = [w * n for w in self.weights]
        counts = [math.floor(q) for q in quotas]
        by_remainder = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))  # largest remainder first
        for i in by_remainder[:n - sum(counts)]:
            counts[i] += 1
        self.counts = counts  # examples drawn from each source per epoch

    def draw(self, epoch: int) -> List[Tuple[int, int]]:
        """(source, example index) of every example epoch ``epoch`` draws, source by source."""
        key = hashlib.sha256(f"mixture seed {self.seed} epoch {epoch}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(key[:7], "little"))  # apart from the batch order's
        picks = []
        for i, (source, count) in enumerate(zip(self.sources, self.counts)):
            passes, rest = divmod(count, len(source))
            picks += [(i, j) for j in range(len(source))] * passes
            picks += [(i, j) for j in torch.randperm(len(source), generator=generator)[:rest].tolist()]
        return picks

    def __call__(self, epoch: int) -> list:
        """Epoch ``epoch``'s training units: examples, or packed rows of them."""
        examples = [self.sources[i][j] for i, j in self.draw(epoch)]
        return pack_examples(examples, self.pack_len, self.seed + epoch) if self.pack_len else examples


@dataclass
class _Epoch:
    units: list
    order: List[int]         # unit indices in the epoch's seeded order
    loss_tokens: List[int]   # per unit
    real_tokens: List[int]


class GlobalBatches:
    """Deterministic order of training units (examples or packed rows) over epochs and ranks.

    Step s of epoch e uses units perm_e[s·G : (s+1)·G] with G = micro · world · accum; micro-batch j of
    rank w takes the slice starting at (j·world + w)·micro. A step is a pure function of (seed, step),
    so resume continues the same sample order. The last incomplete global batch of an epoch is dropped.

    ``units`` is the list of every epoch, or a function epoch -> that epoch's units (a ``Mixture``), itself a pure
    function of the epoch; packed, such epochs may differ in length, so steps are then counted epoch by epoch.
    """

    def __init__(self, units, micro: int, world: int, accum: int, seed: int, packed: bool, pad_id: int):
        self.units_for_epoch = units if callable(units) else (lambda epoch: units)
        self.varies = callable(units)
        self.micro, self.world, self.accum = micro, world, accum
        self.seed, self.packed, self.pad_id = seed, packed, pad_id
        self.global_batch = micro * world * accum
        self._epochs: Dict[int, _Epoch] = {}  # the last two used (a step and the next one's epoch)
        self._epoch_steps: List[int] = []     # steps of epochs 0, 1, ... as far as they were built
        self.units = self._epoch(0).units     # epoch 0's (every epoch's unless they vary)
        self.steps_per_epoch = self._epoch_steps[0]  # epoch 0's (every epoch's unless they vary)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{len(self.units)} training {'rows' if packed else 'examples'} are fewer than one global batch "
                f"({micro} per device x {world} devices x {accum} accumulation = {self.global_batch})"
            )

    def _epoch(self, epoch: int) -> _Epoch:
        """Epoch ``epoch``'s units, order and per-unit token counts (cached: the epochs of this step and the next)."""
        if epoch in self._epochs:
            return self._epochs[epoch]
        if not self.varies and self._epochs:  # the same units every epoch: only the order is new
            any_epoch = next(iter(self._epochs.values()))
            built = _Epoch(any_epoch.units, self._order(len(any_epoch.units), epoch), any_epoch.loss_tokens,
                           any_epoch.real_tokens)
        else:
            while self.varies and len(self._epoch_steps) < epoch:  # the epochs before are counted first
                self._epoch(len(self._epoch_steps))
            units = self.units_for_epoch(epoch)
            exs = (lambda unit: unit) if self.packed else (lambda unit: [unit])
            built = _Epoch(units, self._order(len(units), epoch),
                           [sum(loss_token_count(ex["labels"]) for ex in exs(u)) for u in units],
                           [sum(len(ex["input_ids"]) for ex in exs(u)) for u in units])
        if len(self._epoch_steps) == epoch:
            self._epoch_steps.append(len(built.order) // self.global_batch)
        self._epochs = {**{e: v for e, v in self._epochs.items() if abs(e - epoch) == 1}, epoch: built}
        return built

    def _order(self, n: int, epoch: int) -> List[int]:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        if self.varies and epoch > 0 and n < self.global_batch:  # a later mixture epoch that packed unusually tight
            order = (order * (self.global_batch // n + 1))[:self.global_batch]
        return order

    def locate(self, step: int) -> Tuple[int, int]:
        """(epoch, step within it) of global step ``step`` (0-based)."""
        if not self.varies:
            return divmod(step, self.steps_per_epoch)
        epoch = 0
        while True:
            if epoch == len(self._epoch_steps):
                self._epoch(epoch)
            if step < self._epoch_steps[epoch]:
                return epoch, step
            step -= self._epoch_steps[epoch]
            epoch += 1

    def epoch_at(self, steps_done: int) -> float:
        """Epochs done after ``steps_done`` steps (fractional)."""
        if not self.varies:
            return steps_done / self.steps_per_epoch
        epoch, s = self.locate(steps_done)
        return epoch + s / self._epoch_steps[epoch]

    def steps_for_epochs(self, epochs: float) -> int:
        """Optimizer steps of ``epochs`` epochs (a fractional last epoch rounds up)."""
        if not self.varies:
            return math.ceil(epochs * self.steps_per_epoch)
        whole = int(epochs)
        steps = sum(self._epoch_steps_of(e) for e in range(whole))
        return steps + (math.ceil((epochs - whole) * self._epoch_steps_of(whole)) if epochs > whole else 0)

    def _epoch_steps_of(self, epoch: int) -> int:
        if epoch >= len(self._epoch_steps):
            self._epoch(epoch)
        return self._epoch_steps[epoch]

    def _step(self, step: int) -> Tuple[_Epoch, List[int]]:
        epoch, s = self.locate(step)
        ep = self._epoch(epoch)
        return ep, ep.order[s * self.global_batch:(s + 1) * self.global_batch]

    def step_indices(self, step: int) -> List[int]:
        """Unit indices (into its epoch's units) of global step ``step`` (0-based), in micro-batch-major, rank-minor
        order."""
        return self._step(step)[1]

    def step_units(self, step: int) -> list:
        """The units of global step ``step``, in ``step_indices`` order."""
        ep, indices = self._step(step)
        return [ep.units[i] for i in indices]

    def micro_batches(self, step: int, rank: int) -> Iterator[Dict[str, torch.Tensor]]:
        units = self.step_units(step)
        for j in range(self.accum):
            start = (j * self.world + rank) * self.micro
            chunk = units[start:start + self.micro]
            yield collate_packed(chunk, self.pad_id) if self.packed else pad_batch(chunk, self.pad_id)

    def label_tokens(self, step: int) -> int:
        """Tokens that carry a loss in the whole global batch (every rank computes the same number)."""
        ep, indices = self._step(step)
        return sum(ep.loss_tokens[i] for i in indices)

    def real_tokens(self, step: int) -> int:
        ep, indices = self._step(step)
        return sum(ep.real_tokens[i] for i in indices)
