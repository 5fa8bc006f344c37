"""Data-derived subspaces (``--clora_p_init activations``, and the completion of ``adapters``): one calibration pass over
general text before training.

For every adapted module m (frozen W [out, in]), over the calibration tokens x_t:

    S_in  = Σ_t x_t x_tᵀ                          [in, in]     P_in  = top-k eigenvectors of S_in
    S_out = Σ_t (W x_t)(W x_t)ᵀ = W S_in Wᵀ       [out, out]   P_out = top-k eigenvectors of S_out

The uncentred second moment, not the covariance around the mean: the penalty controls ΔW·x for the raw x the model
sees (F = mean ‖ΔW·x‖/‖x‖), E‖ΔW x‖² = tr(ΔW E[x xᵀ] ΔWᵀ), and LLM activations have a large mean (and a few massive
dimensions) that centring would drop, exactly the directions where ΔW·x would be largest. With ``adapters`` and a
span Q of s < k directions, the last k − s columns are the top eigenvectors of Π S Π, Π = I − Q Qᵀ.

How (``calibrate_subspaces``): every rank runs its share of the calibration rows through the model it trains (eval
mode, no grad, adapters disabled, the DeepSpeed engine under ZeRO-3 so that each layer is gathered as in training);
forward hooks on each adapted module's frozen base layer read its input and add x xᵀ (float64 products) into float32
sums. Modules fed the same input tensor (q/k/v; gate/up) share one S_in. S_out is not summed: it is W S_in Wᵀ exactly
(the layer's output without its bias), formed in float64 at eigendecomposition time on the rank that owns the
module, from W (gathered under ZeRO-3, every rank in a fixed order; dequantized for a 4-bit base) and the shared S_in.
That halves the pass's memory at LLaMA-2-7B shapes (40.9 -> 18.4 GiB of sums per rank). Only a layer whose W cannot
be read that way (``weight_readable``: LLM.int8) keeps an output hook summing y yᵀ. The sums are reduced to one owner
rank per input group (owners balanced by d³), each rank eigendecomposes its own in float64, and the P are broadcast
(``distributed_eigen``); every rank keeps its columns (sharded P), rank 0 writes the whole P once
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
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist

from .config import CLORA_SUBSPACES_NAME, DATA_INITS, MIN_TOKENS_PER_K, CLoRAConfig
from .errors import UserError

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
    """What the launcher does for data-derived P: compute it from ``data`` and/or ``spans`` (a new run) or load
    ``saved`` (a resume)."""

    data: Optional[CalibrationSet] = None
    saved: Optional[Path] = None   # the resumed checkpoint's CLORA_SUBSPACES_NAME
    spans: Optional[Dict[Tuple[str, str], torch.Tensor]] = None  # p_init adapters: (module, side) -> Q [d, s] float64


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


def plan_calibration(clora: CLoRAConfig, tokenizer, row_len: int, cache_dir: Optional[Path], resume: Optional[Path],
                     targets: Optional[Dict[str, Tuple[int, int]]] = None,
                     linears: Optional[Dict[str, Tuple[int, int]]] = None) -> Tuple[Optional[CalibrationPlan], CLoRAConfig, List[str], List[str]]:
    """(plan, the settings with the fingerprint of what P is computed from recorded, problems, notes) for data-derived
    P; ``targets`` (the run's modules) and ``linears`` (the base model's linear layers), name -> (out, in), for
    p_init adapters.

    A new run reads and tokenizes --clora_p_data now, and reads the adapters of --clora_p_adapters and computes their
    spans (so a missing file, too few tokens or a span that does not fit k is refused before anything is written). A
    resume reads nothing but the checkpoint: the run keeps the P it was trained with, whatever the calibration file or
    the adapters hold now (they may have changed or gone; the note says so), since P was fixed at the run's start and
    recomputing it would change the rest of the run."""
    if clora.p_init not in DATA_INITS:
        return None, clora, [], []
    if resume is not None:
        return _plan_resumed(clora, tokenizer, row_len, cache_dir, resume)
    spans, notes, parts = None, [], []
    if clora.p_init == "adapters":
        from .base_adapters import adapters_fingerprint, plan_adapter_spans

        if targets is None or linears is None:
            return None, clora, [], []  # the model could not be inspected: its problems are reported already
        spans, problems = plan_adapter_spans(clora.p_adapters, targets, linears, clora.k, bool(clora.p_data))
        if problems:
            return None, clora, problems, []
        parts.append(f"adapters {adapters_fingerprint(clora.p_adapters)}")
        sizes = sorted(q.shape[1] for q in spans.values())
        notes.append(f"P from --clora_p_adapters {clora.p_adapters}: the adapters span {sizes[0]}-{sizes[-1]} of "
                     f"k={clora.k} directions per P")
        if sizes[0] == clora.k:
            if clora.p_data:
                notes.append(f"--clora_p_data {clora.p_data} is not read: the adapters span all k directions of every P")
            return CalibrationPlan(spans=spans), dataclasses.replace(clora, p_fingerprint="; ".join(parts)), [], notes
    flag = f"--clora_p_data {clora.p_data}"
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
    notes.append(f"calibration for P: {data.tokens:,} tokens of {clora.p_data} in {len(data.rows)} rows of <= {row_len}"
                 + (f" (the whole file: fewer than --clora_p_tokens {clora.p_tokens:,})" if data.tokens < clora.p_tokens else ""))
    if data.tokens < MIN_TOKENS_PER_K * k:
        notes.append(f"{data.tokens:,} calibration tokens are fewer than {MIN_TOKENS_PER_K}·k = {MIN_TOKENS_PER_K * k:,}: "
                     "the top-k directions of P are then a noisy estimate")
    fingerprint = data.fingerprint if spans is None else "; ".join(parts + [f"data {data.fingerprint}"])
    return CalibrationPlan(data=data, spans=spans), dataclasses.replace(clora, p_fingerprint=fingerprint), [], notes


def _plan_resumed(clora: CLoRAConfig, tokenizer, row_len: int, cache_dir: Optional[Path], resume: Path):
    from .base_adapters import adapters_fingerprint
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
    if clora.p_init == "activations":
        parts = {"data": recorded}
    else:  # "adapters FP[; data FP]"
        parts = dict(part.split(" ", 1) for part in str(recorded).split("; ") if " " in part)
    for what, fingerprint in parts.items():
        flag = f"--clora_p_data {clora.p_data}" if what == "data" else f"--clora_p_adapters {clora.p_adapters}"
        try:
            now = (read_calibration(clora.p_data, clora.p_tokens, tokenizer, row_len, cache_dir).fingerprint if what == "data"
                   else adapters_fingerprint(clora.p_adapters))
            if now != fingerprint:
                note += f"; {flag} has changed since then, and is not read again"
        except (UserError, OSError, TypeError):
            note += f"; {flag} cannot be read now, and is not needed"
    return CalibrationPlan(saved=saved), clora, [], [note]


# ---------------------------------------------------------------------------------------------------
# the pass: second moments in forward hooks
# ---------------------------------------------------------------------------------------------------
class SecondMoments:
    """Σ x xᵀ per distinct input, float32 sums, added up in forward hooks on the frozen base layers ``layers`` (module
    name -> layer), and Σ y yᵀ of the outputs of the modules named in ``outputs`` only (those whose W cannot be read:
    ``weight_readable``; every other S_out is W S_in Wᵀ, derived at eigendecomposition time). Inputs are shared by
    identity: a module whose input is the very tensor (same storage, shape and strides) the previous hooked module got,
    in the same forward, adds nothing of its own. An idle forward (``active`` False: a rank out of rows) still learns
    the sharing and creates the zero sums, so every rank holds the same sums for the collectives that follow."""

    def __init__(self, layers: Dict[str, torch.nn.Module], device: torch.device, outputs: Iterable[str] = ()):
        self.layers, self.device = layers, device
        self.summed_outputs = set(outputs)
        self.inputs: Dict[str, torch.Tensor] = {}    # the group's first module -> S_in [in, in]
        self.outputs: Dict[str, torch.Tensor] = {}   # module of ``summed_outputs`` -> S_out [out, out]
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
            summed = [(self.inputs, leader, x)] if leader == name else []
            if name in self.summed_outputs:
                bias = getattr(module, "bias", None)
                if bias is not None and self.active:  # P_out spans W·x; the hook runs before ZeRO-3 releases the bias
                    y = y - bias
                summed.append((self.outputs, name, y))
            for sums, key, t in summed:
                if self.active:
                    _add_second_moment(sums, key, t, self.device)
                elif key not in sums:
                    sums[key] = torch.zeros(t.shape[-1], t.shape[-1], dtype=torch.float32, device=self.device)
        return hook

    def end_forward(self) -> None:
        self._last = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def weight_readable(layer: torch.nn.Module) -> bool:
    """Whether S_out of ``layer`` can be W S_in Wᵀ: a linear layer whose W is stored plainly or in 4 bits (dequantized
    exactly as its forward does). LLM.int8 layers keep the output hook: their forward splits outlier columns off in
    fp16, so their output is not one dequantized W times x."""
    return isinstance(layer, torch.nn.Linear) and type(layer.weight).__name__ != "Int8Params"


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
                              device: torch.device, rank: int = 0, world: int = 1, outputs: Iterable[str] = ()) -> SecondMoments:
    """Run this rank's share of ``rows`` (rows[rank::world]) through ``model`` (a PeftModel or the DeepSpeed engine
    around it) in eval mode without grad, then restore its mode; the sums hold this rank's share only (S_out only of
    the modules in ``outputs``)."""
    moments = SecondMoments(layers, device, outputs)
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
# the whole step: the pass, then each P on its owner rank (distributed_eigen), installed on every rank
# ---------------------------------------------------------------------------------------------------
def calibrate_subspaces(model, rows: List[List[int]], batch_size: int = 4, save_to: Optional[Path] = None,
                        metadata: Optional[dict] = None, log: Callable[[str], None] = print,
                        spans: Optional[Dict[Tuple[str, str], torch.Tensor]] = None) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Compute the data-derived P of ``model`` (a PeftModel from ``attach_clora`` with a data-derived p_init, or the
    DeepSpeed engine around it: every rank calls, each with the same ``rows``) and install it: every rank keeps its
    columns. ``spans`` (p_init adapters: (module, "in"|"out") -> Q [d, s] float64, ``base_adapters.adapter_spans``):
    P = Q completed to k by the activations in Q's orthogonal complement; only modules with s < k are calibrated (no
    pass at all when every span has k directions). Rank 0 writes the whole P to ``save_to`` (CLORA_SUBSPACES_NAME)
    when given, and gets it back (module -> (P_in [in, k], P_out [out, k]) in the P dtype; with activations, modules
    sharing an input share one P_in tensor); other ranks get {} and hold only their columns."""
    from .adapter import PEFT_PREFIX, _unwrap, shard_columns
    from .distributed import barrier, rank as this_rank, world_size
    from .distributed_eigen import EigenJob, eigen_subspaces
    from .subspace import save_subspaces

    peft_model = _unwrap(model)
    regularizer = peft_model.clora
    config = regularizer.config
    k = config.k
    modules = dict(peft_model.named_modules())
    names = sorted(regularizer.subspaces)
    layers = {name: modules[PEFT_PREFIX + name].get_base_layer() for name in names}
    rank, world = this_rank(), world_size()
    device = model.device if isinstance(getattr(model, "device", None), torch.device) else \
        next((p.device for p in peft_model.parameters() if p.requires_grad), torch.device("cpu"))
    short = names if spans is None else [n for n in names if min(spans[(n, "in")].shape[1], spans[(n, "out")].shape[1]) < k]
    inputs, outputs, groups = {}, {}, {}
    if short:
        hooked = {n: layers[n] for n in short}
        summed_outputs = [n for n in short if not weight_readable(layers[n])]
        with peft_model.disable_adapter():  # the base model's own activations, whatever LoRA holds (PEFT's forward runs)
            moments = accumulate_second_moments(model, hooked, rows, batch_size, device, rank, world, summed_outputs)
        inputs, outputs, groups = moments.inputs, moments.outputs, dict(moments.group)
    n_outputs_summed = len(outputs)
    dims = {n: {"in": layers[n].in_features, "out": layers[n].out_features} for n in names}
    if spans is None:  # one P_in per input group, shared by its modules
        in_key = groups
        jobs = [EigenJob(g, "in", dims[g]["in"], g) for g in sorted(set(groups.values()))]
        jobs += [EigenJob(n, "out", dims[n]["out"], groups[n]) for n in names]
    else:  # each module's own span: its own P_in, even where the input (and so S_in) is shared
        in_key = {n: n for n in names}
        jobs = [EigenJob(n, side, dims[n][side], groups.get(n, n), spans[(n, side)]) for n in names for side in ("in", "out")]
    dtype = config.torch_p_dtype
    columns = shard_columns(k, regularizer.shard_rank, regularizer.shard_world)
    whole: Dict[Tuple[str, str], torch.Tensor] = {}  # rank 0: every column
    mine: Dict[Tuple[str, str], torch.Tensor] = {}   # this rank's columns

    def receive(key, side, p):
        p = p.to(dtype)
        if rank == 0:
            whole[(key, side)] = p
        mine[(key, side)] = p[:, columns].contiguous()

    stats = eigen_subspaces(jobs, inputs, outputs, k, receive, layers, rank, world)
    regularizer.install_subspaces({name: (mine[(in_key[name], "in")], mine[(name, "out")]) for name in names})
    full = {name: (whole[(in_key[name], "in")], whole[(name, "out")]) for name in names} if rank == 0 else {}
    tokens = sum(len(r) for r in rows) if short else 0
    log(_calibration_summary(config, stats, spans, tokens, world, len(names), n_outputs_summed))
    if save_to is not None:
        if rank == 0:
            save_subspaces(save_to, full, {"p_init": config.p_init, "k": k, "tokens": tokens, **(metadata or {})})
        barrier()
        regularizer.subspaces_file = Path(save_to)
    return full if rank == 0 else {}


def _calibration_summary(config: CLoRAConfig, stats, spans, tokens: int, world: int, n_modules: int, n_summed: int) -> str:
    measured = {key: v for key, v in stats.items() if v[0] == v[0]}  # NaN: a span with all k directions, no moment

    def energy(side):
        values = [e for (_, s), (e, _) in measured.items() if s == side]
        return f"{min(values):.3f}-{max(values):.3f}" if values else "n/a"

    gap = ""
    if measured:
        (gap_key, gap_side), (_, value) = min(measured.items(), key=lambda kv: kv[1][1])
        gap = f"; smallest eigengap λ_n/λ_n+1 = {value:.4g} ({gap_key} {gap_side})"
    n_in = sum(1 for _, s in measured if s == "in")
    n_out = sum(1 for _, s in measured if s == "out")
    moments = (f"{n_in} input second moments for {n_modules} modules (shared inputs counted once), {n_out} output ones "
               f"({n_out - n_summed} of them W S_in Wᵀ, {n_summed} summed from the outputs)")
    held = f"energy held by P (calibration text): P_in {energy('in')}, P_out {energy('out')}{gap}"
    if spans is None:
        return f"P from activations: {tokens:,} tokens over {world} rank(s); {moments}; {held}"
    counts = {side: sorted(q.shape[1] for (_, s), q in spans.items() if s == side) for side in ("in", "out")}
    text = (f"P from the adapters' spans: {n_modules} modules, P_in spans {counts['in'][0]}-{counts['in'][-1]} and P_out "
            f"{counts['out'][0]}-{counts['out'][-1]} of k={config.k} directions")
    if not measured:
        return text + "; no completion needed"
    return text + f"; completed from activations ({tokens:,} tokens over {world} rank(s); {moments}); {held}"


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
    if plan.saved is None:
        metadata = {"fingerprint": regularizer.config.p_fingerprint}
        if plan.data is not None:
            metadata["source"] = plan.data.source
        if plan.spans is not None:
            metadata["adapters"] = regularizer.config.p_adapters
        calibrate_subspaces(engine, plan.data.rows if plan.data is not None else [], batch_size, save_to=target,
                            log=log, metadata=metadata, spans=plan.spans)
        how = "computed and saved whole"
    else:
        on_rank0(lambda: place_subspaces_file(plan.saved, output_dir))
        barrier()
        regularizer.subspaces_file = target
        how = f"as loaded from {plan.saved}, placed"
    log(f"P (--clora_p_init {regularizer.config.p_init}) {how} in {target}; each checkpoint and the adapter get it")
