"""Recording: one pass over the corpus with hooks on the chosen layers.

Per unit it keeps a running top-k of excerpts ranked by their max activation, a fixed reservoir
of random excerpts (shared by all units), and running moments for summary statistics. Excerpts
are kept as window ids into one table of the windows still referenced, so a saved recording
stores each window's token ids once, however many units rank it. All of it lives on the model's
device, and none of it grows with the corpus. Memory while recording, with float32 activations
and int32 token ids: units x (k + n_random) x window x 4 bytes of activations plus
(units x k + n_random) x window x 4 bytes of token ids (with the defaults k = n_random = 32 and
window 64: a 1536-unit layer 25 + 13 MB; a 14336-unit layer 235 + 117 MB; a 65536-latent SAE
1.07 + 0.54 GB).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from neuronlens.files import write_atomic
from neuronlens.models import raw_bytes
from neuronlens.records import ActivationRecord, NeuronId, NeuronRecord
from neuronlens.subject.hooks import HookPoint, StopForward, check_unit, hook_point, neuron_hooks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordingConfig:
    top_k: int = 48
    n_random: int = 48
    batch_size: int = 16
    seed: int = 0
    quantiles: int = 0        # bins of random_sample_by_quantile (0: none; a second pass when on)
    per_quantile: int = 20    # random excerpts kept per bin


# Each unit's excerpt maxima are counted on one fixed grid, 0 and +-10^(i/16) for |i| <= 64 (1e-4 to
# 1e4 in steps of 15%), while recording; its quantile boundaries are read from the counts.
QUANTILE_EDGES = torch.cat([-(10 ** (torch.arange(64, -65, -1) / 16)), torch.zeros(1),
                            10 ** (torch.arange(-64, 65) / 16)])


def quantile_boundaries(counts: torch.Tensor, bins: int) -> torch.Tensor:
    """[N, bins - 1] boundaries from per-unit counts over ``QUANTILE_EDGES``' buckets [N, H]: the
    i-th is the smallest grid edge at or below which at least i/bins of the unit's excerpts have
    their max (an edge above 1e4 is +inf)."""
    cum = counts.double().cumsum(1)
    levels = torch.arange(1, bins, dtype=torch.float64, device=counts.device) / bins
    first = torch.searchsorted(cum, levels[None, :] * cum[:, -1:], side="left")
    edges = torch.cat([QUANTILE_EDGES.double(), torch.tensor([math.inf], dtype=torch.float64)])
    return edges.to(counts.device)[first].float()


@dataclass
class Recording:
    """The recorded arrays of a set of units; ``token_strings`` maps token ids to their text.
    Excerpts are rows of ``windows``: ``top_windows`` and ``random_windows`` index them."""

    neurons: list[NeuronId]
    windows: torch.Tensor          # [W, T] int: the token ids of every window referenced below
    top_windows: torch.Tensor      # [N, k] int: rows of ``windows``, by activation
    top_acts: torch.Tensor         # [N, k, T] float
    top_max: torch.Tensor          # [N, k] float, -inf where fewer than k windows were seen
    random_windows: torch.Tensor   # [R] int: rows of ``windows``, shared by all units
    random_acts: torch.Tensor      # [N, R, T] float
    moments: torch.Tensor          # [N, 5] float64: sums of a, a^2, a^3, a^4, and the count of
                                   # a > 0 (recordings before it have [N, 4])
    n_tokens: int
    token_strings: dict[int, str]
    meta: dict
    token_bytes: dict[int, str] = field(default_factory=dict)   # hex bytes of the ids that decode
                                                                 # alone to U+FFFD (split characters)
    # with quantile samples (recording.quantiles): per unit, bins of random excerpts by their max
    quantile_windows: torch.Tensor | None = None      # [N, Q, S] int: rows of ``windows``, -1: none
    quantile_acts: torch.Tensor | None = None         # [N, Q, S, T] float
    quantile_boundaries: torch.Tensor | None = None   # [N, Q - 1] float: bin q holds maxes in
                                                      # (boundary q-1, boundary q]

    @property
    def top_tokens(self) -> torch.Tensor:
        """[N, k, T] token ids of each unit's top excerpts."""
        return self.windows[self.top_windows.long()]

    @property
    def random_tokens(self) -> torch.Tensor:
        """[R, T] token ids of the random excerpts."""
        return self.windows[self.random_windows.long()]

    def stats(self, i: int) -> dict[str, float]:
        """Mean, variance, skewness and (excess) kurtosis of neuron i over every corpus token."""
        s1, s2, s3, s4 = (float(x) / self.n_tokens for x in self.moments[i, :4])
        var = max(s2 - s1**2, 0.0)
        if var == 0.0:
            return {"mean": s1, "variance": 0.0, "skewness": math.nan, "kurtosis": math.nan}
        m3 = s3 - 3 * s1 * s2 + 2 * s1**3
        m4 = s4 - 4 * s1 * s3 + 6 * s1**2 * s2 - 3 * s1**4
        return {"mean": s1, "variance": var, "skewness": m3 / var**1.5,
                "kurtosis": m4 / var**2 - 3.0}

    def _record(self, tokens: torch.Tensor, acts: torch.Tensor) -> ActivationRecord:
        ids = [int(t) for t in tokens]
        strings = [self.token_strings[i] for i in ids]
        return ActivationRecord(strings, [float(a) for a in acts], text=self._joined(ids, strings))

    def _joined(self, ids: list[int], strings: list[str]) -> tuple[str, ...] | None:
        """The tokens as they read: each run of byte tokens decoded together (a split character
        whole) on the run's first token, "" on the others; None when no token is split."""
        if not any(i in self.token_bytes for i in ids):
            return None
        out, k = list(strings), 0
        while k < len(ids):
            end = k
            while end < len(ids) and ids[end] in self.token_bytes:
                end += 1
            if end == k:
                k += 1
                continue
            raw = b"".join(bytes.fromhex(self.token_bytes[i]) for i in ids[k:end])
            out[k:end] = [raw.decode("utf-8", errors="replace"), *[""] * (end - k - 1)]
            k = end
        return tuple(out)

    def neuron_record(self, i: int) -> NeuronRecord:
        valid = torch.isfinite(self.top_max[i])
        top = [self._record(t, a) for t, a, ok in
               zip(self.top_tokens[i], self.top_acts[i], valid) if ok]
        rnd = [self._record(t, a) for t, a in zip(self.random_tokens, self.random_acts[i])]
        by_quantile = boundaries = None
        if self.quantile_windows is not None:
            by_quantile = [[self._record(self.windows[w], a) for w, a in zip(rows, acts) if w >= 0]
                           for rows, acts in zip(self.quantile_windows[i], self.quantile_acts[i])]
            boundaries = [float(b) for b in self.quantile_boundaries[i]]
        return NeuronRecord(self.neurons[i], most_positive_activation_records=top,
                            random_sample=rnd, random_sample_by_quantile=by_quantile,
                            quantile_boundaries=boundaries, density=self.density(i), **self.stats(i))

    def density(self, i: int) -> float | None:
        """The fraction of corpus tokens on which unit i is above 0 (None if not recorded)."""
        return float(self.moments[i, 4]) / self.n_tokens if self.moments.shape[1] > 4 else None

    def neuron_records(self) -> Iterator[NeuronRecord]:
        return (self.neuron_record(i) for i in range(len(self.neurons)))

    ARRAYS = ("windows", "top_windows", "top_acts", "top_max", "random_windows", "random_acts", "moments")
    QUANTILE_ARRAYS = ("quantile_windows", "quantile_acts", "quantile_boundaries")   # when recorded

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: getattr(self, k).detach().cpu().contiguous() for k in self.ARRAYS + self.QUANTILE_ARRAYS
                   if getattr(self, k) is not None}
        write_atomic(directory / "arrays.safetensors", save(tensors))
        manifest = {"neurons": [[n.layer, n.index] for n in self.neurons],
                    "n_tokens": self.n_tokens, "meta": self.meta,
                    "token_strings": {str(k): v for k, v in sorted(self.token_strings.items())},
                    "token_bytes": {str(k): v for k, v in sorted(self.token_bytes.items())}}
        # the manifest last: its presence says the arrays beside it are whole
        write_atomic(directory / "manifest.json", json.dumps(manifest, indent=1))

    @classmethod
    def saved(cls, directory: str | Path) -> Recording | None:
        """The recording saved in ``directory``; None when there is none, or when it is torn (a
        crash or a full disk while it was written), which is said in one line and recorded anew."""
        directory = Path(directory)
        if not (directory / "manifest.json").exists():
            return None
        try:
            return cls.load(directory)
        except Exception as e:  # noqa: BLE001 - JSON, safetensors or shape errors: all mean torn
            log.warning("The recording in %s is incomplete or damaged (%s); recording again.",
                        directory, type(e).__name__)
            return None

    @classmethod
    def load(cls, directory: str | Path) -> Recording:
        directory = Path(directory)
        manifest = json.loads((directory / "manifest.json").read_text())
        arrays = load_file(directory / "arrays.safetensors")
        if "top_tokens" in arrays:   # written before window ids: one window per excerpt
            top, rnd = arrays.pop("top_tokens"), arrays.pop("random_tokens")
            n, k, width = top.shape
            arrays |= {"windows": torch.cat([top.reshape(n * k, width), rnd]),
                       "top_windows": torch.arange(n * k).reshape(n, k),
                       "random_windows": torch.arange(n * k, n * k + len(rnd))}
        return cls(neurons=[NeuronId(l, i) for l, i in manifest["neurons"]],
                   **{k: arrays[k] for k in cls.ARRAYS}, **{k: arrays.get(k) for k in cls.QUANTILE_ARRAYS},
                   n_tokens=manifest["n_tokens"], meta=manifest["meta"],
                   token_strings={int(k): v for k, v in manifest["token_strings"].items()},
                   token_bytes={int(k): v for k, v in manifest.get("token_bytes", {}).items()})

    def export_openai(self, directory: str | Path) -> list[Path]:
        """Write one OpenAI-format NeuronRecord JSON per neuron as ``{layer}/{index}.json``."""
        paths = []
        for record in self.neuron_records():
            path = Path(directory) / str(record.neuron_id.layer) / f"{record.neuron_id.index}.json"
            record.save(path)
            paths.append(path)
        return paths


def _batches(windows: Iterable[list[int]], size: int) -> Iterator[list[list[int]]]:
    it = iter(windows)
    while batch := list(islice(it, size)):
        yield batch


def select(parts: Sequence[Recording], neurons: Sequence[NeuronId], meta: dict | None = None) -> Recording:
    """The rows of ``neurons`` from recordings of the same windows (one per layer, say), as one
    recording that keeps only the windows and token strings those rows use."""
    first = parts[0]
    where = {n: (j, i) for j, part in enumerate(parts) for i, n in enumerate(part.neurons)}
    if missing := [str(n) for n in neurons if n not in where]:
        raise ValueError(f"no recording of {', '.join(missing)}")
    for part in parts[1:]:
        if part.n_tokens != first.n_tokens or not torch.equal(part.random_tokens, first.random_tokens):
            raise ValueError("the recordings to select from were not made over the same windows")
    offsets = [0]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + len(part.windows))
    rows = [where[n] for n in neurons]

    def stack(name: str, shift: bool = False) -> torch.Tensor:
        rows_of = [getattr(parts[j], name)[i] for j, i in rows]
        if shift:   # window rows move by their part's offset; -1 (no window) stays
            rows_of = [torch.where(x >= 0, x + offsets[j], x) for x, (j, _) in zip(rows_of, rows)]
        return torch.stack(rows_of)

    top_windows, random_windows = stack("top_windows", shift=True), first.random_windows
    quantiles = first.quantile_windows is not None
    q_windows = stack("quantile_windows", shift=True) if quantiles else torch.zeros(0, dtype=torch.long)
    pieces = [top_windows.flatten(), random_windows, q_windows[q_windows >= 0]]
    used, remap = torch.unique(torch.cat(pieces), return_inverse=True)
    n_top, n_random = top_windows.numel(), len(random_windows)
    if quantiles:
        q_rows = torch.full_like(q_windows, -1)
        q_rows[q_windows >= 0] = remap[n_top + n_random:]
    windows = torch.cat([part.windows for part in parts])[used]
    ids = set(windows.unique().tolist())
    strings = {i: s for part in parts for i, s in part.token_strings.items() if i in ids}
    raw = {i: b for part in parts for i, b in part.token_bytes.items() if i in ids}
    return Recording(neurons=list(neurons), windows=windows,
                     top_windows=remap[:n_top].reshape(top_windows.shape),
                     top_acts=stack("top_acts"), top_max=stack("top_max"),
                     random_windows=remap[n_top:n_top + n_random], random_acts=stack("random_acts"),
                     moments=stack("moments"), n_tokens=first.n_tokens, token_strings=strings,
                     meta=first.meta if meta is None else meta, token_bytes=raw,
                     quantile_windows=q_rows if quantiles else None,
                     quantile_acts=stack("quantile_acts") if quantiles else None,
                     quantile_boundaries=stack("quantile_boundaries") if quantiles else None)


class Recorder:
    """The running state of a recording, fed one batch of windows at a time.

    ``add(ids [B, T], acts [N, B, T])`` keeps, per unit, a running top-k of windows ranked by their
    max activation, a reservoir sample of windows shared by all units (Algorithm R, deterministic
    in the seed), and the running moments; ``finish`` turns it into a ``Recording``. Windows are
    numbered as they come; a table of ``units x k + n_random`` rows (the most that can be
    referenced at once) keeps the token ids of those still referenced, so what it holds is fixed
    from the first batch on. The model recorder feeds it hook outputs; synthetic neurons feed it
    their rules' activations.
    """

    def __init__(self, neurons: Sequence[NeuronId], config: RecordingConfig, device="cpu"):
        self.neurons, self.config, self.device = list(neurons), config, device
        self.state: dict[str, torch.Tensor] = {}
        self.rng = np.random.default_rng(config.seed)
        self.seen = 0
        self.n_tokens = 0

    def _start(self, T: int) -> None:
        N, k, R, dev = len(self.neurons), self.config.top_k, self.config.n_random, self.device
        self.state.update({
            "vals": torch.full((N, k), -math.inf, device=dev),
            "win": torch.full((N, k), -1, dtype=torch.long, device=dev),
            "act": torch.zeros((N, k, T), device=dev),
            "rwin": torch.full((R,), -1, dtype=torch.long, device=dev),
            "ract": torch.zeros((N, R, T), device=dev),
            "mom": torch.zeros((N, 5), dtype=torch.float64, device=dev),
            "table": torch.zeros((N * k + R, T), dtype=torch.int32, device=dev),   # token ids
            "numbers": torch.full((N * k + R,), -1, dtype=torch.long, device=dev),   # their windows
            "refs": torch.zeros((N * k + R,), dtype=torch.int32, device=dev),   # slots holding each
            "wrow": torch.full((N, k), -1, dtype=torch.long, device=dev),   # each slot's table row
            "rrow": torch.full((R,), -1, dtype=torch.long, device=dev)})
        if self.config.quantiles:   # excerpt maxima counted on the quantile grid
            self.state["counts"] = torch.zeros((N, len(QUANTILE_EDGES) + 1), dtype=torch.int32, device=dev)

    def add(self, ids: torch.Tensor, acts: torch.Tensor) -> None:
        k, R = self.config.top_k, self.config.n_random
        B, T = ids.shape
        if not self.state:
            self._start(T)
        state = self.state
        numbers = torch.arange(self.seen, self.seen + B, device=self.device)
        # running top-k by each excerpt's max activation; only the entries that change are copied
        maxes = acts.amax(dim=2)                                                  # [N, B]
        if "counts" in state:
            state["counts"].scatter_add_(1, torch.bucketize(maxes, QUANTILE_EDGES.to(maxes.device)),
                                         torch.ones_like(maxes, dtype=torch.int32))
        vals = torch.cat([state["vals"], maxes], dim=1)                           # [N, k+B]
        top = vals.topk(k, dim=1).indices                                         # [N, k]
        entering = torch.zeros_like(vals, dtype=torch.bool).scatter_(1, top, True)
        leaving = ~entering[:, :k]                                                # slots freed
        rows_out, slots = leaving.nonzero(as_tuple=True)   # row-major: both pair up row by row,
        rows_in, new = entering[:, k:].nonzero(as_tuple=True)   # a row frees what enters it
        state["vals"][rows_out, slots] = vals[rows_in, k + new]
        state["win"][rows_out, slots] = numbers[new]
        state["act"][rows_out, slots] = acts[rows_in, new]
        released = [state["wrow"][rows_out, slots]]
        # reservoir sample of windows (Algorithm R): window w takes slot w while w < R, else a
        # uniform draw from [0, w]; within a batch a later window overwrites an earlier one
        taken = numbers.cpu().numpy().copy()
        late = taken >= R
        taken[late] = self.rng.integers(0, taken[late] + 1)
        chosen = np.flatnonzero(taken < R)
        last = {int(taken[b]): b for b in chosen}           # the last window to take each slot
        slot = torch.tensor(list(last), dtype=torch.long, device=self.device)
        which = torch.tensor(list(last.values()), dtype=torch.long, device=self.device)
        if last:
            state["rwin"][slot] = numbers[which]
            state["ract"][:, slot] = acts[:, which]
            released.append(state["rrow"][slot])
        self.seen += B
        flat = acts.reshape(len(self.neurons), -1).float()
        block = max(1, 2 ** 19 // flat.shape[1])   # units per block of values that stays in cache
        for rows, a in zip(torch.arange(len(flat)).split(block), flat.split(block)):
            a2 = a * a   # powers in float32 per batch, summed across batches in float64
            state["mom"][rows] += torch.stack([a.sum(1), a2.sum(1), torch.linalg.vecdot(a2, a),
                                               torch.linalg.vecdot(a2, a2),
                                               (a > 0).sum(1, dtype=torch.float32)], 1).double()
        self.n_tokens += B * T
        # the windows of this batch now referenced take the table rows no slot refers to any more
        # (each row counts the slots that hold its window)
        released = torch.cat(released)
        released = released[released >= 0]
        state["refs"].scatter_add_(0, released, torch.full_like(released, -1, dtype=torch.int32))
        holds = torch.bincount(torch.cat([new, which]), minlength=B)   # slots each window takes
        kept = holds > 0
        at = torch.full((B,), -1, dtype=torch.long, device=self.device)
        if kept.any():
            free = (state["refs"] == 0).nonzero().flatten()[:int(kept.sum())]
            at[kept] = free
            state["refs"][free] = holds[kept].to(torch.int32)
            state["numbers"][free] = numbers[kept]
            state["table"][free] = ids[kept].to(self.device, torch.int32)
        state["wrow"][rows_out, slots] = at[new]
        state["rrow"][slot] = at[which]

    def finish(self, token_string, meta: dict | None = None, token_bytes=None) -> Recording:
        """The recording; ``token_string(id)`` gives a token's text, and ``token_bytes(id)`` the
        raw bytes of one whose text is a split character's U+FFFD (None when unknown)."""
        state = self.state
        if not state:
            raise ValueError("The corpus gave no windows to record.")
        rwin, ract = state["rwin"], state["ract"]
        if self.seen < self.config.n_random:  # fewer windows than asked for: keep those there are
            rwin, ract = rwin[:self.seen], ract[:, :self.seen]
        keep = state["refs"] > 0
        numbers, order = state["numbers"][keep].sort()   # ascending: a window's row is a search away
        table = state["table"][keep][order]
        row = lambda w: torch.searchsorted(numbers, w.clamp(min=0)).clamp(max=len(numbers) - 1)
        by_value = state["vals"].argsort(dim=1, descending=True, stable=True)   # slots hold no order
        top_max, top_win = state["vals"].gather(1, by_value), state["win"].gather(1, by_value)
        top_acts = state["act"].gather(1, by_value[..., None].expand_as(state["act"]))
        used = torch.bincount(table.flatten().long()).nonzero().flatten().tolist()  # cheaper than a sort
        return Recording(neurons=self.neurons, windows=table, top_windows=row(top_win),
                         top_acts=top_acts, top_max=top_max, random_windows=row(rwin),
                         random_acts=ract, moments=state["mom"], n_tokens=self.n_tokens,
                         token_strings=(strings := {i: token_string(i) for i in used}),
                         token_bytes={i: raw.hex() for i, s in strings.items()
                                      if token_bytes and "\ufffd" in s and (raw := token_bytes(i))},
                         meta={**(meta or {}), "config": asdict(self.config)})


class QuantileSampler:
    """The second pass of quantile samples: per unit, a reservoir of ``per_quantile`` windows in
    each bin between its ``boundaries`` [N, Q - 1] (Algorithm R per bin, deterministic in the
    seed). It keeps the window numbers and their activations, [N, Q, S] and [N, Q, S, T]."""

    def __init__(self, boundaries: torch.Tensor, config: RecordingConfig, device="cpu"):
        self.bounds, self.size = boundaries.to(device), config.per_quantile
        n, bins = boundaries.shape[0], boundaries.shape[1] + 1
        self.counts = torch.zeros((n, bins), dtype=torch.long, device=device)
        self.windows = torch.full((n, bins, self.size), -1, dtype=torch.long, device=device)
        self.acts: torch.Tensor | None = None
        self.rng = np.random.default_rng([config.seed, 1])
        self.seen = 0

    def add(self, ids: torch.Tensor, acts: torch.Tensor) -> None:
        N, B, T = acts.shape
        if self.acts is None:
            self.acts = torch.zeros((*self.windows.shape, T), device=acts.device)
        bins = (acts.amax(dim=2)[..., None] > self.bounds[:, None, :]).sum(-1)   # [N, B]
        units = torch.arange(N, device=acts.device)
        for b in range(B):
            q = bins[:, b]
            self.counts[units, q] += 1
            seen = self.counts[units, q]                       # windows of that bin so far, this one included
            drawn = torch.from_numpy(self.rng.integers(0, seen.cpu().numpy())).to(seen.device)
            slot = torch.where(seen <= self.size, seen - 1, drawn)
            keep = slot < self.size
            self.windows[units[keep], q[keep], slot[keep]] = self.seen + b
            self.acts[units[keep], q[keep], slot[keep]] = acts[keep, b]
        self.seen += B

    def into(self, rec: Recording, windows: Iterable[list[int]], boundaries: torch.Tensor,
             token_string, token_bytes) -> Recording:
        """``rec`` with the quantile samples: their windows' token ids read again from ``windows``
        (the same windows, tokenised again: no forward pass)."""
        wanted = self.windows[self.windows >= 0].unique()
        where = {int(w): j for j, w in enumerate(wanted.tolist())}
        rows = torch.zeros((len(wanted), rec.windows.shape[1]), dtype=rec.windows.dtype)
        for number, window in enumerate(windows):
            if number in where:
                rows[where[number]] = torch.tensor(window, dtype=rec.windows.dtype)
        q_rows = torch.full_like(self.windows, -1).cpu()
        q_rows[self.windows.cpu() >= 0] = len(rec.windows) + torch.searchsorted(
            wanted.cpu(), self.windows[self.windows >= 0].cpu())
        new = set(rows.unique().tolist()) - set(rec.token_strings)
        strings = {i: token_string(i) for i in new}
        raw = {i: b.hex() for i, s in strings.items() if "\ufffd" in s and (b := token_bytes(i))}
        return replace(rec, windows=torch.cat([rec.windows, rows.to(rec.windows.device)]),
                       quantile_windows=q_rows, quantile_acts=self.acts, quantile_boundaries=boundaries,
                       token_strings=rec.token_strings | strings, token_bytes=rec.token_bytes | raw)


@torch.no_grad()
def record(model, tokenizer, windows: Iterable[list[int]] | Callable[[], Iterable[list[int]]],
           neurons: Sequence[NeuronId], config: RecordingConfig = RecordingConfig(), progress: bool = True,
           meta: dict | None = None, points: dict[int, HookPoint] | None = None) -> Recording:
    """Run the model over ``windows`` and keep what each of ``neurons`` responds to: the units
    read at ``points[layer]`` (by default each layer's MLP neurons; an SAE's latents, say). With
    ``config.quantiles``, a second pass over the windows (then a callable that gives them anew)
    samples each unit's excerpts by bins of their max; memory: units x quantiles x per_quantile x
    window x 4 bytes more."""
    if not neurons:
        raise ValueError("No neurons to record; set neurons.layers and neurons.per_layer.")
    if config.quantiles and not callable(windows):
        raise ValueError("Quantile samples take two passes: give the windows as a callable.")
    source = windows if callable(windows) else (lambda: windows)
    layers = sorted({n.layer for n in neurons})
    points = points or {l: hook_point(model, l) for l in layers}
    for n in neurons:
        check_unit(points[n.layer].width, n.layer, n.index, points[n.layer].encode is not None)
    device = next(model.parameters()).device
    # Columns of each layer's activations to keep, and where they go in the [.., N] matrix.
    # (None where that is all of them in order: each gather is a copy of the batch's activations)
    columns = lambda picked, width: (None if width is not None and picked == list(range(width))
                                     else torch.tensor(picked, device=device))
    index = {l: columns([n.index for n in neurons if n.layer == l], points[l].width) for l in layers}
    order = [n for l in layers for n in neurons if n.layer == l]
    position = {n: j for j, n in enumerate(order)}
    restore = columns([position[n] for n in neurons], len(neurons))
    captured: dict[int, torch.Tensor] = {}

    def grab(layer: int, acts: torch.Tensor) -> None:
        captured[layer] = (acts if index[layer] is None else acts[..., index[layer]]).float()
        if layer == layers[-1]:
            raise StopForward  # nothing after the deepest recorded layer is needed

    def one_pass(sink: Callable[[torch.Tensor, torch.Tensor], None], desc: str) -> None:
        with neuron_hooks(model, layers, grab, points):
            bar = tqdm(desc=desc, unit="tok", disable=not progress)
            for batch in _batches(source(), config.batch_size):
                ids = torch.tensor(batch, device=device)
                try:  # the base model: no LM head, and the forward stops at the last hooked layer
                    model.base_model(input_ids=ids, use_cache=False)
                except StopForward:
                    pass
                acts = captured[layers[0]] if len(layers) == 1 else torch.cat([captured[l] for l in layers], -1)
                acts = acts if restore is None else acts[..., restore]                 # [B, T, N]
                sink(ids, acts.permute(2, 0, 1).contiguous())                           # [N, B, T]
                bar.update(ids.numel())
            bar.close()

    recorder = Recorder(neurons, config, device)
    one_pass(recorder.add, "recording")
    token_string, token_bytes = (lambda i: tokenizer.decode([i])), (lambda i: raw_bytes(tokenizer, i))
    rec = recorder.finish(token_string, meta, token_bytes)
    if config.quantiles:
        boundaries = quantile_boundaries(recorder.state["counts"], config.quantiles)
        sampler = QuantileSampler(boundaries, config, device)
        one_pass(sampler.add, "quantile samples")
        rec = sampler.into(rec, source(), boundaries, token_string, token_bytes)
    return rec
