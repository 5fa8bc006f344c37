"""Data-derived subspaces (``--clora_p_init activations``): one calibration pass over general text before training.

For every adapted module m (frozen W [out, in]), over the calibration tokens x_t:

    S_in  = Σ_t x_t x_tᵀ            [in, in]     P_in  = top-k eigenvectors of S_in
    S_out = Σ_t (W x_t)(W x_t)ᵀ     [out, out]   P_out = top-k eigenvectors of S_out

The uncentred second moment, not the covariance around the mean: the penalty controls ΔW·x for the raw x the model
sees (F = mean ‖ΔW·x‖/‖x‖), E‖ΔW x‖² = tr(ΔW E[x xᵀ] ΔWᵀ), and LLM activations have a large mean (and a few massive
dimensions) that centring would drop, exactly the directions where ΔW·x would be largest.

How (``calibrate_subspaces``): every rank runs its share of the calibration rows through the model it trains (eval
mode, no grad, adapters disabled, the DeepSpeed engine under ZeRO-3 so that each layer is gathered as in training);
forward hooks on each adapted module's frozen base layer read its input and its OUTPUT (never the weight: under
ZeRO-3 the weight is a shard outside the layer's forward, and for a 4-bit base the output is already the dequantized
W·x) and add x xᵀ and y yᵀ (float64 products) into float32 sums. Modules fed the same input tensor (q/k/v; gate/up) share one S_in.
The sums are reduced to one owner rank each (owners balanced by d³), each rank eigendecomposes its own in float64,
and the P are broadcast; every rank keeps its columns (sharded P), rank 0 writes the whole P once
(CLORA_SUBSPACES_NAME in the output directory; each checkpoint and the adapter link or copy it). A resume loads that
file and never recomputes.

Calibration rows: the examples of --clora_p_data tokenized as for training ([bos] text [eos], or a chat template's
ids), concatenated in file order, the first --clora_p_tokens tokens cut into rows of --max_seq_length (as LM
calibration sets are: a row may span documents).
"""
from __future__ import annotations

import dataclasses
import hashlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .config import CLORA_SUBSPACES_NAME, DATA_INITS, MIN_TOKENS_PER_K, CLoRAConfig
from .errors import UserError
from .subspace import top_eigenvectors

NO_TRUNCATION = 1 << 40  # calibration examples are cut into rows, never truncated one by one


# ---------------------------------------------------------------------------------------------------
# the calibration tokens, read and checked before anything is written (plan_run)
# ---------------------------------------------------------------------------------------------------
@dataclass
class CalibrationSet:
    """The calibration tokens: rows of ids (all of ``row_len`` tokens but maybe the last)."""

    source: str
    rows: List[List[int]]
    available: int     # tokens the file holds, tokenized
    fingerprint: str   # sha256 of the rows' ids (recorded as CLoRAConfig.p_fingerprint)

    @property
    def tokens(self) -> int:
        return sum(len(r) for r in self.rows)


@dataclass
class CalibrationPlan:
    """What the launcher does for data-derived P: compute it from ``data`` (a new run) or load ``saved`` (a resume)."""

    data: Optional[CalibrationSet] = None
    saved: Optional[Path] = None   # the resumed checkpoint's CLORA_SUBSPACES_NAME


def calibration_rows(examples: List[List[int]], n_tokens: int, row_len: int) -> List[List[int]]:
    """The first ``n_tokens`` of the examples' ids, concatenated, cut into rows of ``row_len`` (the last may be shorter)."""
    stream: List[int] = []
    for ids in examples:
        stream.extend(ids[: n_tokens - len(stream)])
        if len(stream) >= n_tokens:
            break
    return [stream[i:i + row_len] for i in range(0, len(stream), row_len)]


def rows_fingerprint(rows: List[List[int]]) -> str:
    h = hashlib.sha256(b"clora-calibration")
    for row in rows:
        h.update(array("q", row).tobytes())
        h.update(b"|")
    return "sha256:" + h.hexdigest()


def read_calibration(path: str, n_tokens: int, tokenizer, row_len: int, cache_dir: Optional[Path]) -> CalibrationSet:
    """The calibration rows of ``path``, read and tokenized by the training data's reader (format detected from its
    keys; a .txt file is plain text); DataError naming the file when it cannot be read."""
    from .data import load_records, tokenize_records

    records = load_records(path)
    tokenized = tokenize_records(records, f"--clora_p_data {path}", tokenizer, "auto", NO_TRUNCATION,
                                 train_on_prompt=True, cache_dir=cache_dir)
    examples = [ex["input_ids"] for ex in tokenized.examples]
    rows = calibration_rows(examples, n_tokens, row_len)
    return CalibrationSet(path, rows, sum(len(e) for e in examples), rows_fingerprint(rows))


def plan_calibration(clora: CLoRAConfig, tokenizer, row_len: int, cache_dir: Optional[Path],
                     resume: Optional[Path]) -> Tuple[Optional[CalibrationPlan], CLoRAConfig, List[str], List[str]]:
    """(plan, the settings with the calibration's fingerprint recorded, problems, notes) for data-derived P.

    A new run reads and tokenizes --clora_p_data now (so a missing file or too few tokens is refused before anything
    is written). A resume reads nothing but the checkpoint: the run keeps the P it was trained with, whatever the
    calibration file holds now (it may have changed or gone; the note says so), since P was fixed at the run's
    start and recomputing it from other text would change the rest of the run."""
    if clora.p_init not in DATA_INITS:
        return None, clora, [], []
    flag = f"--clora_p_data {clora.p_data}"
    if resume is not None:
        from .subspace import subspaces_path

        saved = subspaces_path(resume)
        if not saved.is_file():
            return None, clora, [f"cannot resume {resume}: it has no {CLORA_SUBSPACES_NAME}, the P (--clora_p_init "
                                 f"{clora.p_init}) it was trained with; copy the whole checkpoint directory"], []
        try:
            recorded = CLoRAConfig.load(resume).p_fingerprint
        except UserError as err:
            return None, clora, [f"cannot resume {resume}: {err}"], []
        clora = dataclasses.replace(clora, p_fingerprint=recorded)
        note = f"P (--clora_p_init {clora.p_init}) loaded from {saved}, as the run computed it at its start"
        try:
            now = read_calibration(clora.p_data, clora.p_tokens, tokenizer, row_len, cache_dir).fingerprint
            if now != recorded:
                note += f"; {flag} has changed since then, and is not read again"
        except UserError:
            note += f"; {flag} cannot be read now, and is not needed"
        return CalibrationPlan(saved=saved), clora, [], [note]
    if not Path(clora.p_data).is_file():
        return None, clora, [f"{flag}: no such file; give the calibration text (any training format, e.g. a .txt file)"], []
    try:
        data = read_calibration(clora.p_data, clora.p_tokens, tokenizer, row_len, cache_dir)
    except UserError as err:
        return None, clora, [str(err)], []
    k = clora.k
    if data.tokens < k:
        return None, clora, [f"{flag} holds {data.available:,} tokens, fewer than --clora_k {k}: the second moment of n "
                             f"tokens has rank <= n, so P needs at least k = {k} tokens (>= {MIN_TOKENS_PER_K * k:,} "
                             "for a stable estimate); give more calibration text or a smaller --clora_k"], []
    notes = [f"calibration for P: {data.tokens:,} tokens of {clora.p_data} in {len(data.rows)} rows of <= {row_len}"
             + (f" (the whole file: fewer than --clora_p_tokens {clora.p_tokens:,})" if data.tokens < clora.p_tokens else "")]
    if data.tokens < MIN_TOKENS_PER_K * k:
        notes.append(f"{data.tokens:,} calibration tokens are fewer than {MIN_TOKENS_PER_K}·k = {MIN_TOKENS_PER_K * k:,}: "
                     "the top-k directions of P are then a noisy estimate")
    return CalibrationPlan(data=data), dataclasses.replace(clora, p_fingerprint=data.fingerprint), [], notes


# ---------------------------------------------------------------------------------------------------
# the pass: second moments in forward hooks
# ---------------------------------------------------------------------------------------------------
class SecondMoments:
    """Σ x xᵀ per distinct input and Σ y yᵀ per module output, float32 sums, added up in forward hooks on the frozen base
    layers ``layers`` (module name -> layer). Inputs are shared by identity: a module whose input is the very tensor
    (same storage, shape and strides) the previous hooked module got, in the same forward, adds nothing of its own.
    An idle forward (``active`` False: a rank out of rows) still learns the sharing and creates the zero sums, so every
    rank holds the same sums for the collectives that follow."""

    def __init__(self, layers: Dict[str, torch.nn.Module], device: torch.device):
        self.layers, self.device = layers, device
        self.inputs: Dict[str, torch.Tensor] = {}    # the group's first module -> S_in [in, in]
        self.outputs: Dict[str, torch.Tensor] = {}   # module -> S_out [out, out]
        self.group: Dict[str, str] = {}              # module -> the module whose S_in it shares (itself: its own)
        self.active = False
        self._last: Optional[Tuple[torch.Tensor, str]] = None
        self._handles = [layer.register_forward_hook(self._hook(name), prepend=True) for name, layer in layers.items()]

    @staticmethod
    def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                          and a.dtype == b.dtype)

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0]
            leader = self._last[1] if self._last is not None and self._same(self._last[0], x) else name
            if self.group.setdefault(name, leader) != leader:
                raise RuntimeError(f"CLoRA calibration: {name} shares its input with {leader} in one forward and with "
                                   f"{self.group[name]} in another")
            self._last = (x, leader)
            y = output[0] if isinstance(output, tuple) else output
            if not self.active:
                for sums, key, d in ((self.inputs, leader, x.shape[-1]), (self.outputs, name, y.shape[-1])):
                    if key not in sums:
                        sums[key] = torch.zeros(d, d, dtype=torch.float32, device=self.device)
                return
            if leader == name:
                _add_second_moment(self.inputs, name, x, self.device)
            bias = getattr(module, "bias", None)
            if bias is not None:  # P_out spans W·x; the hook runs before ZeRO-3 releases the bias (prepend)
                y = y - bias
            _add_second_moment(self.outputs, name, y, self.device)
        return hook

    def end_forward(self) -> None:
        self._last = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _add_second_moment(sums: Dict[str, torch.Tensor], key: str, x: torch.Tensor, device: torch.device) -> None:
    """sums[key] += xᵀx over the tokens of x [..., d]: the product in float64 (a float32 GEMM over a thousand tokens
    loses ~1e-6 of relative precision, which moves P by as much), the running sum in float32 (half the memory of the
    largest state here: Σ d² over the distinct inputs and outputs)."""
    flat = x.detach().reshape(-1, x.shape[-1]).to(device, torch.float64)  # [tokens, d]
    if key not in sums:
        sums[key] = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float32, device=device)
    sums[key] += flat.T @ flat


def _forward_batches(rows: List[List[int]], rank: int, world: int, batch_size: int) -> Tuple[List[List[List[int]]], int]:
    """(this rank's batches of equal-length rows, the number of forwards every rank runs): ZeRO-3 gathers each layer
    in lockstep, so a rank with fewer rows runs idle forwards to match."""
    def batches(mine):
        full = [r for r in mine if len(r) == len(rows[0])]
        short = [r for r in mine if len(r) != len(rows[0])]
        out = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
        return out + [[r] for r in short]

    per_rank = [batches(rows[r::world]) for r in range(world)]
    return per_rank[rank], max(len(b) for b in per_rank)


@torch.no_grad()
def accumulate_second_moments(model, layers: Dict[str, torch.nn.Module], rows: List[List[int]], batch_size: int,
                              device: torch.device, rank: int = 0, world: int = 1) -> SecondMoments:
    """Run this rank's share of ``rows`` (rows[rank::world]) through ``model`` (a PeftModel or the DeepSpeed engine
    around it) in eval mode without grad, then restore its mode; the sums hold this rank's share only."""
    moments = SecondMoments(layers, device)
    mine, n_forwards = _forward_batches(rows, rank, world, batch_size)
    was_training = model.training
    model.eval()
    try:
        for i in range(n_forwards):
            moments.active = i < len(mine)
            batch = mine[i] if moments.active else [rows[0][:1]]
            ids = torch.tensor(batch, dtype=torch.long, device=device)
            model(input_ids=ids, use_cache=False, logits_to_keep=1)  # only the layers' activations are needed
            moments.end_forward()
    finally:
        moments.remove()
        model.train(was_training)
    return moments


# ---------------------------------------------------------------------------------------------------
# reduce, eigendecompose (each rank its share), broadcast
# ---------------------------------------------------------------------------------------------------
@dataclass
class EigenJob:
    key: str    # a module name: its output, or the input group it leads
    side: str   # "in" | "out"
    dim: int
    owner: int = 0


def assign_owners(jobs: List[EigenJob], world: int) -> List[EigenJob]:
    """Each job to the least-loaded rank, largest first (cost d³): deterministic, so every rank agrees."""
    load = [0.0] * world
    for job in sorted(jobs, key=lambda j: (-j.dim, j.key, j.side)):
        job.owner = min(range(world), key=lambda r: (load[r], r))
        load[job.owner] += float(job.dim) ** 3
    return jobs


def eigen_subspaces(moments: SecondMoments, k: int, receive: Callable[[str, str, torch.Tensor], None], rank: int = 0,
                    world: int = 1) -> Dict[Tuple[str, str], Tuple[float, float]]:
    """Hand ``receive(key, side, P [d, k] float64 on the CPU)`` the top-k eigenvectors of each sum added over every
    rank, one at a time (so no rank holds every P in float64); returns {(key, side): (energy, gap)}, energy = Σ top-k
    eigenvalues / trace (the calibration energy P holds), gap = λ_k / λ_k+1. Collective: every rank calls it; the sums
    are consumed (freed as they are reduced)."""
    from .distributed import collective_device

    sums = {("in", key): t for key, t in moments.inputs.items()} | {("out", key): t for key, t in moments.outputs.items()}
    jobs = assign_owners([EigenJob(key, side, t.shape[0]) for (side, key), t in sorted(sums.items())], world)
    distributed = world > 1 and dist.is_initialized()
    mine = {}
    for job in jobs:  # every rank's share summed on its owner; the others free theirs at once
        s = sums.pop((job.side, job.key))
        if distributed:
            dist.reduce(s, dst=job.owner)
        if job.owner == rank:
            mine[(job.key, job.side)] = s
    results, stats = {}, torch.zeros(len(jobs), 2, dtype=torch.float64)
    for i, job in enumerate(jobs):
        if job.owner == rank:
            p, values = top_eigenvectors(mine.pop((job.key, job.side)), k)  # float64, where the sum is (GPU or CPU)
            results[(job.key, job.side)], values = p.cpu(), values.cpu()
            kept = values[:k].clamp(min=0)
            stats[i, 0] = kept.sum() / values.clamp(min=0).sum().clamp(min=1e-300)
            stats[i, 1] = values[k - 1] / values[k].clamp(min=1e-300) if k < values.numel() else float("inf")
    device = collective_device()
    for job in jobs:
        p = results.pop((job.key, job.side)).to(device) if job.owner == rank else \
            torch.empty(job.dim, k, dtype=torch.float64, device=device)
        if distributed:
            dist.broadcast(p, src=job.owner)
        receive(job.key, job.side, p.cpu())
    if distributed:
        stats = stats.to(device)
        dist.all_reduce(stats)  # each row is non-zero on its owner only
        stats = stats.cpu()
    return {(j.key, j.side): (stats[i, 0].item(), stats[i, 1].item()) for i, j in enumerate(jobs)}


def calibrate_subspaces(model, rows: List[List[int]], batch_size: int = 4, save_to: Optional[Path] = None,
                        metadata: Optional[dict] = None, log: Callable[[str], None] = print) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Compute the activations P of ``model`` (a PeftModel from ``attach_clora`` with a data-derived p_init, or the
    DeepSpeed engine around it: every rank calls, each with the same ``rows``) and install it: every rank keeps its
    columns. Rank 0 writes the whole P to ``save_to`` (CLORA_SUBSPACES_NAME) when given, and gets it back
    (module -> (P_in [in, k], P_out [out, k]) in the P dtype; modules sharing an input share one P_in tensor); other
    ranks get {} and hold only their columns."""
    from .adapter import PEFT_PREFIX, _unwrap, shard_columns
    from .distributed import barrier, rank as this_rank, world_size
    from .subspace import save_subspaces

    peft_model = _unwrap(model)
    regularizer = peft_model.clora
    config = regularizer.config
    modules = dict(peft_model.named_modules())
    layers = {name: modules[PEFT_PREFIX + name].get_base_layer() for name in sorted(regularizer.subspaces)}
    rank, world = this_rank(), world_size()
    device = model.device if isinstance(getattr(model, "device", None), torch.device) else \
        next((p.device for p in peft_model.parameters() if p.requires_grad), torch.device("cpu"))
    with peft_model.disable_adapter():  # the base model's own activations, whatever LoRA holds (PEFT's forward runs)
        moments = accumulate_second_moments(model, layers, rows, batch_size, device, rank, world)
    groups = dict(moments.group)
    dtype = config.torch_p_dtype
    columns = shard_columns(config.k, regularizer.shard_rank, regularizer.shard_world)
    whole: Dict[Tuple[str, str], torch.Tensor] = {}  # rank 0: every column
    mine: Dict[Tuple[str, str], torch.Tensor] = {}   # this rank's columns

    def receive(key, side, p):
        p = p.to(dtype)
        if rank == 0:
            whole[(key, side)] = p
        mine[(key, side)] = p[:, columns].contiguous()

    stats = eigen_subspaces(moments, config.k, receive, rank, world)
    regularizer.install_subspaces({name: (mine[(groups[name], "in")], mine[(name, "out")]) for name in layers})
    full = {name: (whole[(groups[name], "in")], whole[(name, "out")]) for name in layers} if rank == 0 else {}
    energy_in = [e for (key, side), (e, _) in stats.items() if side == "in"]
    energy_out = [e for (key, side), (e, _) in stats.items() if side == "out"]
    (gap_key, gap_side), (_, gap) = min(stats.items(), key=lambda kv: kv[1][1])
    log(f"P from activations: {sum(len(r) for r in rows):,} tokens over {world} rank(s); {len(energy_in)} input second "
        f"moments for {len(layers)} modules (shared inputs counted once), {len(energy_out)} output ones; energy held "
        f"by the top-{config.k} (calibration text): P_in {min(energy_in):.3f}-{max(energy_in):.3f}, P_out "
        f"{min(energy_out):.3f}-{max(energy_out):.3f}; smallest eigengap λ_k/λ_k+1 = {gap:.4g} ({gap_key} {gap_side})")
    if save_to is not None:
        if rank == 0:
            save_subspaces(save_to, full, {"p_init": config.p_init, "k": config.k, "tokens": sum(len(r) for r in rows),
                                           **(metadata or {})})
        barrier()
        regularizer.subspaces_file = Path(save_to)
    return full if rank == 0 else {}


def data_subspaces(engine, regularizer, plan: Optional[CalibrationPlan], output_dir: Path, batch_size: int,
                   log: Callable[[str], None]) -> None:
    """The launcher's step for data-derived P, after ``deepspeed.initialize`` (every rank calls; nothing without a
    plan): compute P from the calibration rows, or keep the one loaded from the resumed checkpoint; either way the
    whole P ends up in OUT/CLORA_SUBSPACES_NAME, which each checkpoint links."""
    from .distributed import barrier, on_rank0
    from .subspace import place_subspaces_file

    if plan is None:
        return
    target = Path(output_dir) / CLORA_SUBSPACES_NAME
    if plan.data is not None:
        calibrate_subspaces(engine, plan.data.rows, batch_size, save_to=target, log=log,
                            metadata={"source": plan.data.source, "fingerprint": plan.data.fingerprint})
        how = "computed and saved whole"
    else:
        on_rank0(lambda: place_subspaces_file(plan.saved, output_dir))
        barrier()
        regularizer.subspaces_file = target
        how = f"as loaded from {plan.saved}, placed"
    log(f"P (--clora_p_init {regularizer.config.p_init}) {how} in {target}; each checkpoint and the adapter get it")
