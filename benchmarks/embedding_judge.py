"""Can the embedding judge (``simulator=embedding``) tell a true explanation from a wrong one?

Rule neurons with known answers over real text: the built-in corpus cut into 64-token windows by
the embedded SmolLM2 tokenizer (tokens as strings, ``tokenizer.decode`` per id, as a recording
has them). A rule marks the tokens of every word it matches (activation 10, else 0). Seven rules
are about meaning (digits, animals, weather, days, negation, colours, food), one needs context
(years: the same digit tokens as any other number) and one is formal (capitalised words: the
judge's known blind spot). Each rule neuron gets ``--top`` windows where it fires (a seeded
sample, standing in for a recording's top excerpts) plus ``--random`` windows shared by all
neurons (the random excerpts), and is scored as the pipeline scores a test split: Pearson
correlation of simulated and true activations over all tokens of its excerpts.

Every judge variant scores each neuron with its true explanation and with every other rule's
explanation ("shuffled"). Variants: the token's text alone; the text of a window of tokens
embedded as a string (the first design); the token in context (the encoder's contextual
word-piece embeddings of one pass over the excerpt); their average; and the default
(``EmbeddingSimulator()``, same as ``conf/simulator/embedding.yaml``): the average with a floor.

Headline ``ratio`` (default variant): mean true r over the eight non-formal rules divided by the
mean, over the same rules, of the *best* shuffled r (the most competitive wrong explanation;
clipped below at 0.05 so a near-zero denominator cannot inflate it). Run with no arguments
(<= 3 min on 2 CPU cores; one torch thread by default, see ``--threads``); the last line printed
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import time

from common import RESULTS, machine, machine_line  # benchmarks/common.py, beside this script

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _words(*words: str) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(words) + r")\b", re.I)


# name -> (kind, true explanation, pattern); kinds: semantic, context, formal
RULES = {
    "digits": ("semantic", "numbers and digits", re.compile(r"\d+")),
    "animals": ("semantic", "names of animals", _words(
        "dogs?", "cats?", "fish", "cows?", "chickens?", "bears?", "ducks?", "bees?", "horses?",
        "birds?", "sheep", "wolf", "fox", "mice", "mouse", "goats?", "pigs?", "hens?", "owls?",
        "rabbits?", "deer", "insects?")),
    "weather": ("semantic", "words about the weather", _words(
        "rain", "raining", "rainy", "snow", "sunny", "wind", "windy", "storms?", "clouds?",
        "cloudy", "fog", "weather", "forecast", "frost", "thunder", "humid", "sunshine",
        "showers", "drizzle", "hail", "temperatures?", "cold", "heat", "breeze", "ice", "icy",
        "wet", "dry", "warm")),
    "days": ("semantic", "days of the week", _words(
        "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday",
        "weekends?")),
    "negation": ("semantic", "negation words such as not, no and never", re.compile(
        r"\b(not|never|no|none|nobody|nothing|neither|nor|without)\b|n't", re.I)),
    "colours": ("semantic", "colour words", _words(
        "red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "grey",
        "gray", "pink")),
    "food": ("semantic", "food and cooking ingredients", _words(
        "bread", "cheese", "soup", "rice", "apples?", "butter", "eggs?", "sugar", "flour", "salt",
        "garlic", "onions?", "tomato(es)?", "meat", "pasta", "sauce", "coffee", "tea", "milk",
        "potato(es)?", "chicken", "beans", "vegetables", "fruit", "carrots?", "lemon", "oil",
        "pepper", "honey", "cake", "stew")),
    "years": ("context", "years, such as 1987 or 2015", re.compile(r"\b(1[6-9]|20)\d\d\b")),
    "capitals": ("formal", "words that start with a capital letter", re.compile(r"\b[A-Z][a-z]+")),
}


def rule_activations(tokens: list[str], pattern: re.Pattern) -> list[float]:
    """10 on every token that overlaps a match of ``pattern`` in the excerpt's text, else 0."""
    text = "".join(tokens)
    hit = [False] * len(text)
    for m in pattern.finditer(text):
        hit[m.start():m.end()] = [True] * (m.end() - m.start())
    out, pos = [], 0
    for t in tokens:
        out.append(10.0 if any(hit[pos:pos + len(t)]) else 0.0)
        pos += len(t)
    return out


def rule_neurons(windows: list[list[str]], n_top: int, n_random: int, seed: int) -> dict:
    from neuronlens.records import ActivationRecord

    shared = random.Random(seed).sample(range(len(windows)), n_random)
    neurons = {}
    for name, (_, _, pattern) in RULES.items():
        acts = [rule_activations(w, pattern) for w in windows]
        firing = [i for i, a in enumerate(acts) if max(a) > 0]
        top = random.Random(f"{seed}/{name}").sample(firing, min(n_top, len(firing)))
        chosen = top + [i for i in shared if i not in top]
        neurons[name] = {"records": [ActivationRecord(windows[i], acts[i]) for i in chosen],
                         "n_top": len(top), "windows_firing": len(firing),
                         "tokens_firing": sum(a > 0 for i in chosen for a in acts[i])}
    return neurons


def text_window_judge(window: tuple[int, int]):
    """The first design, kept here for comparison: embed the text of the ``window`` tokens around
    each token as one string (one encoder input per distinct window)."""
    import numpy as np

    from neuronlens.embedding import EmbeddingSimulator

    class TextWindow(EmbeddingSimulator):
        def similarities(self, explanation, records):
            left, right = self.window
            target = self._embed_texts([explanation])[0]
            contexts = [["".join(r.tokens[max(0, i - left):i + right + 1]).strip()
                         for i in range(len(r.tokens))] for r in records]
            texts = sorted({c for cs in contexts for c in cs} - {""})
            vec = dict(zip(texts, self._cached(self._texts, texts, self._embed_texts, 10**7)))
            return [np.array([float(vec[c] @ target) if c else 0.0 for c in cs])
                    for cs in contexts]

    return TextWindow(window=list(window), context_weight=0.0, floor=0.0, device="cpu")


def evaluate(judge, neurons: dict) -> dict:
    from neuronlens.score import score

    def r(explanation: str, records) -> float | None:
        sim = judge.simulate(explanation, records)
        return score([x.activations for x in records], [list(e) for e in sim.expected]).correlation

    start = time.perf_counter()
    rules = {}
    for name, neuron in neurons.items():
        true = r(RULES[name][1], neuron["records"])
        if name == next(iter(neurons)):
            first = time.perf_counter() - start
        wrong = {other: r(RULES[other][1], neuron["records"]) for other in RULES if other != name}
        values = [v for v in wrong.values() if v is not None]
        best = max(wrong, key=lambda k: -2 if wrong[k] is None else wrong[k])
        rules[name] = {"kind": RULES[name][0], "true_r": true,
                       "shuffled_mean_r": sum(values) / len(values) if values else None,
                       "shuffled_max_r": wrong[best], "best_wrong_rule": best, "shuffled": wrong}
    return {"rules": rules, "seconds": time.perf_counter() - start, "first_neuron_seconds": first}


def summarise(rules: dict) -> dict:
    meaning = [v for v in rules.values() if v["kind"] != "formal" and v["true_r"] is not None]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    true = mean([v["true_r"] for v in meaning])
    best_wrong = mean([v["shuffled_max_r"] for v in meaning])
    return {"mean_true_r": true, "mean_shuffled_r": mean([v["shuffled_mean_r"] for v in meaning]),
            "mean_best_shuffled_r": best_wrong,
            "mean_abs_shuffled_r": mean([abs(x) for v in meaning for x in v["shuffled"].values()
                                         if x is not None]),
            "wins": sum(v["true_r"] > v["shuffled_max_r"] for v in meaning), "of": len(meaning),
            "ratio": true / max(best_wrong, 0.05) if true is not None else None,
            "formal_true_r": [v["true_r"] for v in rules.values() if v["kind"] == "formal"]}


def fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def markdown(res: dict) -> str:
    s = res["summary"]
    lines = [
        "# Embedding judge benchmark", "", machine_line(res["machine"]), "",
        f"Subject tokens: SmolLM2 tokenizer over the built-in corpus ({res['n_windows']} windows of "
        f"64 tokens). Per rule neuron: up to {res['args']['top']} windows where the rule fires + "
        f"{res['args']['random']} shared random windows, activation 10 on every token of a "
        "matching word. Score: Pearson r over all tokens of a neuron's excerpts (as the "
        "pipeline's `all` test score). *Shuffled*: each of the other rules' explanations.", "",
        "## Variants (means over the 8 rules that are not formal)", "",
        "| variant | true r | shuffled r (mean) | best shuffled r | true beats every shuffled "
        "| capitals (formal) true r | ratio | s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, v in res["variants"].items():
        m = v["summary"]
        lines.append(f"| {name} | {fmt(m['mean_true_r'])} | {fmt(m['mean_shuffled_r'])} | "
                     f"{fmt(m['mean_best_shuffled_r'])} | {m['wins']}/{m['of']} | "
                     f"{', '.join(fmt(x) for x in m['formal_true_r'])} | {fmt(m['ratio'])} | "
                     f"{v['seconds']:.0f} |")
    lines += ["", "`s`: seconds for the variant (all explanations on all neurons); variants after "
              "the first reuse its cached token and excerpt embeddings, the text-window one "
              "encodes every distinct window string.", ""]
    for name in res["detail"]:
        lines += [f"## Per rule: {name}", "",
                  "| rule | kind | true r | shuffled r (mean) | best shuffled r (rule) |",
                  "|---|---|---:|---:|---:|"]
        for rule, v in res["variants"][name]["rules"].items():
            lines.append(f"| {rule} | {v['kind']} | {fmt(v['true_r'])} | "
                         f"{fmt(v['shuffled_mean_r'])} | {fmt(v['shuffled_max_r'])} "
                         f"({v['best_wrong_rule']}) |")
        lines.append("")
    d = res["variants"][res["default"]]
    lines += [
        "## Reading it", "",
        f"Headline (`{res['default']}`, the shipped config): `ratio` = mean true r / mean best "
        f"shuffled r = {fmt(s['mean_true_r'])} / {fmt(s['mean_best_shuffled_r'])} = "
        f"**{fmt(s['ratio'])}** (denominator clipped below at 0.05). The best shuffled r is the "
        "most competitive wrong explanation per neuron, a harder comparison than the mean over "
        "wrong explanations (which sits near 0 and would make any ratio large and noisy).",
        "",
        f"Speed: the default judge simulated its first neuron ({res['first_neuron_excerpts']} "
        f"excerpts x 64 tokens, cold caches, model loaded) in {d['first_neuron_seconds']:.1f} s "
        f"with {res['machine']['torch_threads']} torch thread(s). On a shared 2-core machine one "
        "thread is much faster than two for this small encoder (OpenMP threads wait on a busy "
        "core), hence `--threads 1`.", "",
        "Caveats: the default's `context_weight` and `floor` were picked on these same rules, "
        "so its figures are optimistic for unseen neurons (`--seed N` draws other windows for a "
        "check). The rules are word lists, so the token alone already carries most of the "
        "answer; years, which needs context, is where the in-context half pays. Rule neurons "
        "fire on whole words; real neurons are fuzzier and score lower. The capitalisation rule "
        "is the expected failure: a sentence embedding does not see case or spelling. Every "
        "figure here is from this embedding judge, not from an LM simulator.",
        "", f"Wall time {res['wall_seconds']:.0f} s (CPU {res['cpu_seconds']:.0f} s); load "
        f"average at end {', '.join(f'{x:.1f}' for x in res['machine']['load_average_at_end'])}.",
    ]
    return "\n".join(lines) + "\n"


def tokenizer_strings(max_windows: int | None) -> list[list[str]]:
    from transformers import AutoTokenizer

    from neuronlens.corpus import BuiltinCorpus, token_windows
    from neuronlens.subject.models import embedded_gguf

    gguf = embedded_gguf("embedded")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    strings: dict[int, str] = {}
    return [[strings.setdefault(i, tokenizer.decode([i])) for i in w]
            for w in token_windows(BuiltinCorpus(), tokenizer, 64, max_windows)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--top", type=int, default=20, help="windows where the rule fires, per neuron")
    p.add_argument("--random", type=int, default=20, help="shared random windows")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--text-window", type=int, nargs=2, default=(2, 0), metavar=("LEFT", "RIGHT"))
    p.add_argument("--no-text-window", action="store_true", help="skip the slow text variant")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    start = time.perf_counter()

    import torch

    from neuronlens.embedding import EmbeddingSimulator, load_encoder

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine("cpu")
    windows = tokenizer_strings(None)
    neurons = rule_neurons(windows, args.top, args.random, args.seed)
    load_encoder("embedded", "cpu")

    default = EmbeddingSimulator(device="cpu")
    d = default.describe()
    default_name = (f"token + in context (w {d['context_weight']}), floor {d['floor']} "
                    "[default]")
    variants = {default_name: default,
                "token alone": EmbeddingSimulator(context_weight=0.0, floor=0.0, device="cpu"),
                "token alone, floor 0.15": EmbeddingSimulator(context_weight=0.0, floor=0.15,
                                                              device="cpu"),
                "in context only": EmbeddingSimulator(context_weight=1.0, floor=0.0, device="cpu"),
                "token + in context (w 0.5), floor 0": EmbeddingSimulator(
                    context_weight=0.5, floor=0.0, device="cpu")}
    default.cache_size = 10**6  # every excerpt of the benchmark stays cached
    for judge in list(variants.values())[1:]:  # same encoder and window: share the embeddings
        judge._texts, judge._excerpts, judge.cache_size = default._texts, default._excerpts, 10**6
    if not args.no_text_window:
        left, right = args.text_window
        variants[f"text of a window [{left}, {right}] as one string"] = text_window_judge(
            (left, right))
    results = {}
    for name, judge in variants.items():
        results[name] = evaluate(judge, neurons)
        results[name]["summary"] = summarise(results[name]["rules"])
        print(name, json.dumps({k: v for k, v in results[name]["summary"].items()}), flush=True)

    detail = [default_name, "token alone"] + [n for n in variants if n.startswith("text")]
    res = {"benchmark": "embedding_judge", "args": vars(args), "machine": info,
           "n_windows": len(windows), "default": default_name, "default_config": d,
           "rules": {k: {"kind": v[0], "explanation": v[1]} for k, v in RULES.items()},
           "neurons": {k: {kk: vv for kk, vv in v.items() if kk != "records"}
                       for k, v in neurons.items()},
           "first_neuron_excerpts": len(next(iter(neurons.values()))["records"]),
           "variants": results, "detail": detail}
    res["wall_seconds"] = time.perf_counter() - start
    use = resource.getrusage(resource.RUSAGE_SELF)
    res["cpu_seconds"] = use.ru_utime + use.ru_stime
    res["machine"]["load_average_at_end"] = list(os.getloadavg())
    s = results[default_name]["summary"]
    res["summary"] = {"benchmark": "embedding_judge", "ratio": round(s["ratio"], 3),
                      "mean_true_r": round(s["mean_true_r"], 3),
                      "mean_shuffled_r": round(s["mean_shuffled_r"], 3),
                      "mean_best_shuffled_r": round(s["mean_best_shuffled_r"], 3),
                      "wins": f"{s['wins']}/{s['of']}",
                      "capitals_true_r": [round(x, 3) for x in s["formal_true_r"] if x is not None],
                      "judge": "simulator=embedding (all-MiniLM-L6-v2)",
                      "wall_seconds": round(res["wall_seconds"], 1)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "embedding_judge.json").write_text(json.dumps(res, indent=1) + "\n")
    (RESULTS / "embedding_judge.md").write_text(markdown(res))
    print(json.dumps(res["summary"]))


if __name__ == "__main__":
    main()
