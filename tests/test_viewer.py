"""The neuron viewer in a real headless Chromium (Debian's, driven by Selenium through the system
chromedriver; nothing downloads a browser): sorting, search, neuron pages, shading, hover values,
and text from the corpus that never runs as script."""

from __future__ import annotations

import json
import os
import re
import shutil
from itertools import islice
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import neuronlens.pipeline as pipeline
from neuronlens.conf import CONF_DIR
from neuronlens.report.site import page_name, write_site

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCRIPT = "<script>window.__pwned=1</script>"


def _rgba(css: str) -> tuple[float, ...]:
    """'rgba(1, 2, 3, 0.5)' or 'rgb(1, 2, 3)' as numbers (alpha 1 when absent)."""
    inner = css[css.index("(") + 1:css.rindex(")")]
    parts = [float(p) for p in inner.split(",")]
    return tuple(parts + [1.0] * (4 - len(parts)))


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("no system chromium/chromedriver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1280,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def real_run(tiny_llama_dir, tmp_path_factory) -> Path:
    """A real pipeline run on the tiny model over a corpus laced with a script tag."""
    from neuronlens.corpus import BuiltinCorpus

    tmp = tmp_path_factory.mktemp("viewer-run")
    corpus = tmp / "corpus.txt"
    texts = list(islice(BuiltinCorpus().texts(), 40))
    corpus.write_text("\n\n".join(f"{t} {SCRIPT}" for t in texts))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=[
            f"subject.model={tiny_llama_dir}", "subject.device=cpu", "corpus=files",
            f"corpus.paths=[{corpus}]", "explainer=top_tokens",   # an explanation that reads
            f"simulator.model={tiny_llama_dir}", "neurons.layers=[0,1]", "neurons.per_layer=3",
            "recording.top_k=12", "recording.n_random=12", "recording.window=16",
            "explain.max_tokens=8", "progress=false"])
    pipeline.run(cfg, tmp / "run")
    return tmp / "run"


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "neurons.jsonl").read_text().splitlines()]


def test_index_sorts_and_searches(browser, real_run):
    from selenium.webdriver.common.by import By

    index = write_site(real_run)
    assert index == real_run / "viewer" / "index.html"
    rows = _rows(real_run)
    browser.get(index.as_uri())
    assert browser.execute_script("return window.__pwned") is None

    def shown() -> list[tuple[int, int]]:
        return [(int(tr.get_attribute("data-layer")), int(tr.get_attribute("data-index")))
                for tr in browser.find_elements(By.CSS_SELECTOR, "#neurons tbody tr.neuron")
                if tr.is_displayed()]

    assert shown() == sorted((r["layer"], r["index"]) for r in rows)
    browser.find_element(By.ID, "sort-score").click()  # best first, failed neurons last
    by_score = sorted((r for r in rows if r["score"] is not None), key=lambda r: -r["score"])
    expected = [(r["layer"], r["index"]) for r in by_score]
    assert shown()[:len(expected)] == expected
    browser.find_element(By.ID, "sort-score").click()  # and reversed
    assert shown()[:len(expected)] == expected[::-1]
    browser.find_element(By.ID, "sort-layer").click()
    assert shown() == sorted((r["layer"], r["index"]) for r in rows)
    browser.find_element(By.ID, "sort-layer").click()
    assert shown() == sorted(((r["layer"], r["index"]) for r in rows), reverse=True)

    # a word of some explanation, typed in capitals (case does not matter); ASCII so that the
    # driver can type it, whatever a random model wrote
    words = [(w, r) for r in rows for w in re.findall(r"[A-Za-z]{2,}", r["explanation"] or "")]
    word, target = max(words, key=lambda p: len(p[0])) if words else ("", rows[0])
    browser.find_element(By.ID, "search").send_keys(word.upper())
    hits = shown()
    assert (target["layer"], target["index"]) in hits
    assert all(word.lower() in (r["explanation"] or r.get("error") or "").lower()
               for r in rows if (r["layer"], r["index"]) in hits)
    browser.find_element(By.ID, "search").send_keys(" zzqx-no-such-word")
    assert shown() == []


def test_neuron_page_shades_tokens_and_shows_exact_values(browser, real_run, tmp_path):
    from selenium.webdriver.common.by import By

    index = write_site(real_run, tmp_path / "site")
    rows = [r for r in _rows(real_run) if r.get("test_excerpts")]
    row = max(rows, key=lambda r: max(max(e["true"]) for e in r["test_excerpts"]))
    browser.get(index.as_uri())
    link = browser.find_element(By.CSS_SELECTOR, f'a[href="neurons/{page_name(row["layer"], row["index"])}"]')
    link.click()
    assert browser.current_url.endswith(page_name(row["layer"], row["index"]))
    assert browser.find_element(By.ID, "explanation").text == row["explanation"]
    assert browser.execute_script("return window.__pwned") is None

    cells = browser.find_elements(By.CSS_SELECTOR, ".excerpt .t")
    true = [v for e in row["test_excerpts"] for v in e["true"]]
    simulated = [v for e in row["test_excerpts"] for v in e["simulated"]]
    assert len(cells) == len(true)
    hi, lo = true.index(max(true)), min(range(len(true)), key=lambda i: abs(true[i]))
    hi_bg = _rgba(cells[hi].value_of_css_property("background-color"))
    lo_bg = _rgba(cells[lo].value_of_css_property("background-color"))
    assert hi_bg != lo_bg and hi_bg[3] > lo_bg[3]
    for i in (hi, lo):  # exact values on hover, as Python writes the floats of neurons.jsonl
        assert cells[i].get_attribute("data-true") == repr(true[i])
        assert cells[i].get_attribute("title").startswith(f"true {true[i]!r} · simulated {simulated[i]!r}")
    drawn = browser.execute_script(
        "return Array.from(document.querySelectorAll('.excerpt .s'), s => s.dataset.simulated)")
    assert [float(v) for v in drawn] == simulated
    text = browser.execute_script(
        "return Array.from(document.querySelectorAll('.excerpt .t'), t => t.textContent).join('')")
    assert "script" in text  # the corpus's tag is drawn as text (split into tokens)
    shot = tmp_path / "neuron.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def _hand_row(layer: int, index: int, score, explanation, tokens, true, simulated, **extra) -> dict:
    row = {"layer": layer, "index": index, "max_activation": max(true), "explanation": explanation,
           "explanations": [{"text": explanation}], "score": score,
           "scores": {"test": {"all": {"correlation": score, "r_squared": 0.1,
                                       "absolute_dev_explained": 0.2, "n_tokens": len(tokens),
                                       "n_excerpts": 1, "flag": None}}},
           "test_excerpts": [{"kind": "top", "tokens": tokens, "true": true, "simulated": simulated}],
           "usage": {"explainer": [10, 2], "simulator": [30, 0]},
           "failures": {"explanations": 0, "excerpts": 0}, "seconds": 0.5}
    return row | extra


def test_injected_markup_is_shown_as_text(browser, tmp_path):
    from selenium.webdriver.common.by import By

    run = tmp_path / "run"
    run.mkdir()
    evil = '<img src=x onerror="window.__pwned=2">'
    rows = [
        _hand_row(2, 7, 0.5, f"tags like {evil}", ["Hello", SCRIPT, " world", "\n", " end"],
                  [0.1, 3.0, -1.5, 0.0, 0.2], [0.5, 8.0, 0.0, 0.1, 1.0],
                  judges={f"embed {evil}": {"score": 0.25, "scores": {"test": {"all": {"correlation": 0.25}}},
                                            "test_simulated": [[0.1, 0.9, 0.2, 0.0, 0.3]]}}),
        {"layer": 2, "index": 8, "max_activation": 1.0, "explanation": None, "score": None,
         "scores": {"test": None}, "error": f"the explainer failed: {SCRIPT}",
         "usage": {"explainer": [0, 0], "simulator": [0, 0]},
         "failures": {"explanations": 1, "excerpts": 0}, "seconds": 0.1},
    ]
    (run / "neurons.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({"subject": SCRIPT, "explainer": evil,
                                                  "simulator": "sim", "mean_score": 0.5}))
    index = write_site(run)
    html = index.read_text() + (index.parent / "neurons" / page_name(2, 7)).read_text()
    assert SCRIPT not in html and "<img" not in html

    browser.get(index.as_uri())
    assert browser.execute_script("return window.__pwned") is None
    assert SCRIPT in browser.find_element(By.TAG_NAME, "h1").text
    assert evil in browser.find_element(By.TAG_NAME, "body").text
    browser.get((index.parent / "neurons" / page_name(2, 7)).as_uri())
    assert browser.execute_script("return window.__pwned") is None
    assert browser.find_element(By.ID, "explanation").text == f"tags like {evil}"
    cells = browser.find_elements(By.CSS_SELECTOR, ".excerpt .t")
    assert [c.text for c in cells][:3] == ["Hello", SCRIPT, " world"]  # spaces kept
    assert cells[3].text == "↵"  # a newline token is drawn as a mark
    assert browser.execute_script("return getComputedStyle(arguments[0]).whiteSpace", cells[2]) == "pre"
    neg = _rgba(cells[2].value_of_css_property("background-color"))
    pos = _rgba(cells[1].value_of_css_property("background-color"))
    assert neg[:3] != pos[:3]  # negative activations get another hue
    judge_rows = browser.find_elements(By.CSS_SELECTOR, "#judges tbody tr")
    assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in judge_rows] == ["simulator", f"embed {evil}"]
    judge_strips = browser.find_elements(By.CSS_SELECTOR, ".excerpt .j")
    assert judge_strips[1].get_attribute("title") == f"embed {evil} 0.9"
    browser.get((index.parent / "neurons" / page_name(2, 8)).as_uri())
    assert browser.execute_script("return window.__pwned") is None
    assert SCRIPT in browser.find_element(By.ID, "error").text


def test_per_excerpt_judges_show_their_answers_under_each_excerpt(browser, tmp_path):
    """Detection and fuzzing answer per excerpt: each excerpt shows what each answered against the
    truth (failed where it failed, nothing where it was not asked), and no per-token strip."""
    from selenium.webdriver.common.by import By

    run = tmp_path / "run"
    run.mkdir()
    row = _hand_row(1, 3, 0.4, "the word cat", ["The", " cat", " sat"], [0.0, 4.0, 0.5], [0.0, 9.0, 1.0],
                    judges={"detection": {"score": 0.75, "metric": "balanced_accuracy",
                                          "scores": {"test": {"all": {"balanced_accuracy": 0.75}}},
                                          "test_predictions": [[{"label": 1, "answer": 0, "p": 0.31}], None]},
                            "fuzzing": {"score": 1.0, "metric": "balanced_accuracy",
                                        "scores": {"test": {"all": {"balanced_accuracy": 1.0}}},
                                        "test_predictions": [[{"label": 1, "answer": 1, "p": None},
                                                              {"label": 0, "answer": 0, "p": 0.12}], ()]}})
    row["test_excerpts"].append({"kind": "random", "tokens": ["A", " dog"], "true": [0.1, 0.0],
                                 "simulated": [0.2, 0.0]})
    (run / "neurons.jsonl").write_text(json.dumps(row) + "\n")
    (run / "summary.json").write_text(json.dumps({"subject": "s", "explainer": "e", "simulator": "sim"}))
    index = write_site(run)
    browser.get((index.parent / "neurons" / page_name(1, 3)).as_uri())
    excerpts = browser.find_elements(By.CSS_SELECTOR, ".excerpt")
    answers = [[a.text for a in ex.find_elements(By.CSS_SELECTOR, ".answer")] for ex in excerpts]
    assert answers == [
        ["detection: wrong: answered 0 (P(1) 0.31), truth 1",
         "fuzzing: right: answered 1, truth 1; right: answered 0 (P(1) 0.12), truth 0"],
        ["detection: failed"]]   # fuzzing asked nothing about a random excerpt
    assert all(a.is_displayed() for a in browser.find_elements(By.CSS_SELECTOR, ".answer"))
    assert len(excerpts[0].find_elements(By.CSS_SELECTOR, ".j")) == 0   # no judge strip per token
    judge_rows = browser.find_elements(By.CSS_SELECTOR, "#judges tbody tr")
    assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in judge_rows] == ["simulator", "detection", "fuzzing"]


def test_site_without_a_run_is_a_clear_error(tmp_path):
    from neuronlens.errors import UserError

    with pytest.raises(UserError, match="no neurons.jsonl"):
        write_site(tmp_path)


UNICODE = ("The mitochondria of cells 🙂 make energy; 日本語 is read in Tokyo, a café serves a naïve "
           "résumé 🎉 and more mitochondria.")


@pytest.fixture(scope="module")
def unicode_run(tiny_llama_dir, tmp_path_factory) -> Path:
    """A real run over text whose emoji and CJK characters the tiny byte-level tokenizer splits
    into byte tokens."""
    tmp = tmp_path_factory.mktemp("unicode-run")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(UNICODE.replace("cells", f"cells {i}") for i in range(40)))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=[
            f"subject.model={tiny_llama_dir}", "subject.device=cpu", "corpus=files",
            f"corpus.paths=[{corpus}]", "explainer=top_tokens",   # an explanation that reads
            f"simulator.model={tiny_llama_dir}", "neurons.layers=[1]", "neurons.per_layer=2",
            "recording.top_k=12", "recording.n_random=12", "recording.window=48", "judges=null",
            "judge_power.enabled=false", "recording.cache=false", "progress=false"])
    pipeline.run(cfg, tmp / "run")
    return tmp / "run"


def test_split_characters_words_histogram_and_legend(browser, unicode_run, tmp_path):
    """A character split into byte tokens reads as itself in one box; a word's tokens touch; the
    histogram counts every test token; every legend swatch sits left of its label."""
    from selenium.webdriver.common.by import By

    rows = [r for r in _rows(unicode_run) if r.get("test_excerpts")]
    joined = ["".join(e["text"]) for r in rows for e in r["test_excerpts"] if "text" in e]
    assert joined and any("🙂" in j and "日本語" in j for j in joined)
    for r in rows:   # the text is for display: tokens stay as the simulator saw them
        for e in r["test_excerpts"]:
            assert "text" not in e or len(e["text"]) == len(e["tokens"])

    index = write_site(unicode_run, tmp_path / "site")
    row = rows[0]
    browser.get((index.parent / "neurons" / page_name(row["layer"], row["index"])).as_uri())
    drawn = browser.execute_script(
        "return Array.from(document.querySelectorAll('.excerpt'), e => "
        "Array.from(e.querySelectorAll('.t'), t => t.textContent).join(''))")
    assert any("🙂" in d and "日本語" in d for d in drawn)
    merged = browser.find_elements(By.CSS_SELECTOR, ".t[data-bytes]")
    assert merged and all(int(m.get_attribute("data-bytes")) >= 2 for m in merged)
    assert all("byte tokens" in m.get_attribute("title") for m in merged)

    # the words: tokens of one word touch (no gap), each word on one line
    gaps = browser.execute_script("""
        const out = [];
        for (const w of document.querySelectorAll('.word')) {
          const ts = Array.from(w.querySelectorAll('.t'), t => t.getBoundingClientRect());
          for (let i = 1; i < ts.length; i++) out.push([ts[i].left - ts[i - 1].right, ts[i].top - ts[i - 1].top]);
        }
        return out;""")
    assert gaps and all(abs(dx) < 0.5 and abs(dy) < 0.5 for dx, dy in gaps)
    words = browser.execute_script(
        "return Array.from(document.querySelectorAll('.word'), "
        "w => Array.from(w.querySelectorAll('.t'), t => t.textContent).join(''))")
    assert any(w.strip() == "mitochondria" for w in words)

    # the histogram: two bars per bin, and its counts are the test tokens
    bars = browser.find_elements(By.CSS_SELECTOR, "#histogram rect.bar")
    counts = [int(re.search(r": (\d+) ", b.find_element(By.TAG_NAME, "title").get_attribute("textContent")).group(1))
              for b in bars]
    assert len(bars) == 48 and sum(counts) == sum(len(e["true"]) for e in row["test_excerpts"])

    # the output side: the promoted and suppressed tokens, as the row holds them
    cells = [c.get_attribute("textContent") for c in browser.find_elements(By.CSS_SELECTOR, "#logits td.out code")]
    assert cells[:2] == [row["logits"]["promoted"][0][0], row["logits"]["suppressed"][0][0]]
    assert len(cells) == 20

    # the legends: a swatch, then its label, for every item that has one
    order = browser.execute_script("""
        return Array.from(document.querySelectorAll('.legend .item'), item => {
          const sw = item.querySelector('.sw');
          if (!sw) return null;
          return [item.firstElementChild === sw, sw.getBoundingClientRect().right <= item.getBoundingClientRect().right - 4];
        }).filter(x => x !== null);""")
    assert len(order) >= 4 and all(first and left for first, left in order)
    shot = tmp_path / "viewer_neuron.png"   # the README's picture: NEURONLENS_SCREENSHOTS=benchmarks/results
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("NEURONLENS_SCREENSHOTS"):   # to look at: NEURONLENS_SCREENSHOTS=<folder>
        Path(os.environ["NEURONLENS_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["NEURONLENS_SCREENSHOTS"]) / shot.name)
