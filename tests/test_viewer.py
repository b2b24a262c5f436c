"""The neuron viewer in a real headless Chromium (Debian's, driven by Selenium through the system
chromedriver; nothing downloads a browser): sorting, search, neuron pages, shading, hover values,
and text from the corpus that never runs as script."""

from __future__ import annotations

import json
import re
from itertools import islice
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import neuronlens.pipeline as pipeline
from neuronlens.cli import CONF_DIR
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
            f"corpus.paths=[{corpus}]", f"explainer.model={tiny_llama_dir}",
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
                  judges={f"embed {evil}": {"score": 0.25, "scores": {"test": {"all": 0.25}},
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
    assert f"embed {evil}" in browser.find_element(By.CSS_SELECTOR, "h2.judge").text
    judge_strips = browser.find_elements(By.CSS_SELECTOR, ".excerpt .j")
    assert judge_strips[1].get_attribute("title") == f"embed {evil} 0.9"
    browser.get((index.parent / "neurons" / page_name(2, 8)).as_uri())
    assert browser.execute_script("return window.__pwned") is None
    assert SCRIPT in browser.find_element(By.ID, "error").text


def test_site_without_a_run_is_a_clear_error(tmp_path):
    from neuronlens.errors import UserError

    with pytest.raises(UserError, match="no neurons.jsonl"):
        write_site(tmp_path)
