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
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Sequence

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
        return NeuronRecord(self.neurons[i], most_positive_activation_records=top,
                            random_sample=rnd, density=self.density(i), **self.stats(i))

    def density(self, i: int) -> float | None:
        """The fraction of corpus tokens on which unit i is above 0 (None if not recorded)."""
        return float(self.moments[i, 4]) / self.n_tokens if self.moments.shape[1] > 4 else None

    def neuron_records(self) -> Iterator[NeuronRecord]:
        return (self.neuron_record(i) for i in range(len(self.neurons)))

    ARRAYS = ("windows", "top_windows", "top_acts", "top_max", "random_windows", "random_acts", "moments")

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: getattr(self, k).detach().cpu().contiguous() for k in self.ARRAYS}
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
                   **{k: arrays[k] for k in cls.ARRAYS},
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
        return torch.stack([getattr(parts[j], name)[i] + (offsets[j] if shift else 0) for j, i in rows])

    top_windows, random_windows = stack("top_windows", shift=True), first.random_windows
    used, remap = torch.unique(torch.cat([top_windows.flatten(), random_windows]), return_inverse=True)
    windows = torch.cat([part.windows for part in parts])[used]
    ids = set(windows.unique().tolist())
    strings = {i: s for part in parts for i, s in part.token_strings.items() if i in ids}
    raw = {i: b for part in parts for i, b in part.token_bytes.items() if i in ids}
    return Recording(neurons=list(neurons), windows=windows,
                     top_windows=remap[:top_windows.numel()].reshape(top_windows.shape),
                     top_acts=stack("top_acts"), top_max=stack("top_max"),
                     random_windows=remap[top_windows.numel():], random_acts=stack("random_acts"),
                     moments=stack("moments"), n_tokens=first.n_tokens, token_strings=strings,
                     meta=first.meta if meta is None else meta, token_bytes=raw)


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
            "numbers": torch.full((N * k + R,), -1, dtype=torch.long, device=dev)})  # their windows

    def add(self, ids: torch.Tensor, acts: torch.Tensor) -> None:
        k, R = self.config.top_k, self.config.n_random
        B, T = ids.shape
        if not self.state:
            self._start(T)
        state = self.state
        numbers = torch.arange(self.seen, self.seen + B, device=self.device)
        # running top-k by each excerpt's max activation; only the entries that change are copied
        vals = torch.cat([state["vals"], acts.amax(dim=2)], dim=1)               # [N, k+B]
        top = vals.topk(k, dim=1).indices                                         # [N, k]
        entering = torch.zeros_like(vals, dtype=torch.bool).scatter_(1, top, True)
        leaving = ~entering[:, :k]                                                # slots freed
        rows_out, slots = leaving.nonzero(as_tuple=True)   # row-major: both pair up row by row,
        rows_in, new = entering[:, k:].nonzero(as_tuple=True)   # a row frees what enters it
        state["vals"][rows_out, slots] = vals[rows_in, k + new]
        state["win"][rows_out, slots] = numbers[new]
        state["act"][rows_out, slots] = acts[rows_in, new]
        # reservoir sample of windows (Algorithm R): window w takes slot w while w < R, else a
        # uniform draw from [0, w]; within a batch a later window overwrites an earlier one
        taken = numbers.cpu().numpy().copy()
        late = taken >= R
        taken[late] = self.rng.integers(0, taken[late] + 1)
        chosen = np.flatnonzero(taken < R)
        last = {int(taken[b]): b for b in chosen}           # the last window to take each slot
        if last:
            slot = torch.tensor(list(last), device=self.device)
            which = torch.tensor(list(last.values()), device=self.device)
            state["rwin"][slot] = numbers[which]
            state["ract"][:, slot] = acts[:, which]
        self.seen += B
        a = acts.reshape(len(self.neurons), -1).float()
        a2 = a * a   # powers in float32 per batch, summed across batches in float64
        state["mom"] += torch.stack([a.sum(1), a2.sum(1), (a2 * a).sum(1), (a2 * a2).sum(1),
                                     (a > 0).sum(1)], 1).double()
        self.n_tokens += B * T
        # the windows of this batch now referenced take the table rows nothing refers to any more
        referenced = torch.cat([state["win"].flatten(), state["rwin"]])
        kept = torch.isin(numbers, referenced)
        if kept.any():
            unused = (state["numbers"] < 0) | ~torch.isin(state["numbers"], referenced)
            free = unused.nonzero().flatten()[:int(kept.sum())]
            state["numbers"][free] = numbers[kept]
            state["table"][free] = ids[kept].to(self.device, torch.int32)

    def finish(self, token_string, meta: dict | None = None, token_bytes=None) -> Recording:
        """The recording; ``token_string(id)`` gives a token's text, and ``token_bytes(id)`` the
        raw bytes of one whose text is a split character's U+FFFD (None when unknown)."""
        state = self.state
        if not state:
            raise ValueError("The corpus gave no windows to record.")
        rwin, ract = state["rwin"], state["ract"]
        if self.seen < self.config.n_random:  # fewer windows than asked for: keep those there are
            rwin, ract = rwin[:self.seen], ract[:, :self.seen]
        referenced = torch.cat([state["win"].flatten(), rwin])
        keep = (state["numbers"] >= 0) & torch.isin(state["numbers"], referenced)
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


@torch.no_grad()
def record(model, tokenizer, windows: Iterable[list[int]], neurons: Sequence[NeuronId],
           config: RecordingConfig = RecordingConfig(), progress: bool = True,
           meta: dict | None = None, points: dict[int, HookPoint] | None = None) -> Recording:
    """Run the model over ``windows`` and keep what each of ``neurons`` responds to: the units
    read at ``points[layer]`` (by default each layer's MLP neurons; an SAE's latents, say)."""
    if not neurons:
        raise ValueError("No neurons to record; set neurons.layers and neurons.per_layer.")
    layers = sorted({n.layer for n in neurons})
    points = points or {l: hook_point(model, l) for l in layers}
    for n in neurons:
        check_unit(points[n.layer].width, n.layer, n.index, points[n.layer].encode is not None)
    device = next(model.parameters()).device
    # Columns of each layer's activations to keep, and where they go in the [.., N] matrix.
    index = {l: torch.tensor([n.index for n in neurons if n.layer == l], device=device)
             for l in layers}
    order = [n for l in layers for n in neurons if n.layer == l]
    position = {n: j for j, n in enumerate(order)}
    restore = torch.tensor([position[n] for n in neurons], device=device)
    recorder = Recorder(neurons, config, device)
    captured: dict[int, torch.Tensor] = {}

    def grab(layer: int, acts: torch.Tensor) -> None:
        captured[layer] = acts[..., index[layer]].float()
        if layer == layers[-1]:
            raise StopForward  # nothing after the deepest recorded layer is needed

    with neuron_hooks(model, layers, grab, points):
        bar = tqdm(desc="recording", unit="tok", disable=not progress)
        for batch in _batches(windows, config.batch_size):
            ids = torch.tensor(batch, device=device)
            try:  # the base model: no LM head, and the forward stops at the last hooked layer
                model.base_model(input_ids=ids, use_cache=False)
            except StopForward:
                pass
            acts = torch.cat([captured[l] for l in layers], dim=-1)[..., restore]  # [B, T, N]
            recorder.add(ids, acts.permute(2, 0, 1))                                # [N, B, T]
            bar.update(ids.numel())
        bar.close()
    return recorder.finish(lambda i: tokenizer.decode([i]), meta, lambda i: raw_bytes(tokenizer, i))
