"""`effitrain report`: runs and sweeps as one self-contained HTML page (and Markdown) of curves and final figures;
sweep configs under configs/sweep/ (a grid with the basic sweeper, a search with Optuna)."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import TINY, effitrain_cli
from effitrain.report import collect, table_rows, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _fake_run(path: Path, *, recipe: str, lr: float, losses: list[float], eval_loss: float) -> Path:
    """A run directory as effitrain writes it, with hand-chosen numbers."""
    path.mkdir(parents=True)
    lines = [{"step": 0, "tokens": 0, "eval_loss": 6.0, "eval_loss/code": 6.1, "eval_loss/prose": 5.9}]
    lines += [{"step": i + 1, "tokens": 256 * (i + 1), "loss": loss, "lr": lr, "tokens_per_s": 1000.0 + i,
               "peak_memory_bytes": 300 * 2**20} for i, loss in enumerate(losses)]
    lines += [{"step": len(losses), "tokens": 256 * len(losses), "eval_loss": eval_loss,
               "eval_loss/code": eval_loss + 0.1, "eval_loss/prose": eval_loss - 0.1}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    (path / "summary.json").write_text(json.dumps({
        "finished": True, "steps": len(losses), "tokens": 256 * len(losses), "final_eval_loss": eval_loss,
        "tokens_per_s": 1234.5, "train_seconds": 75.0, "training_state_bytes": 12 * 2**20}))
    (path / "recipes.yaml").write_text(yaml.safe_dump([{"name": recipe, "paper": "x"}]))
    (path / "command.txt").write_text(f"effitrain +recipe={recipe} optimizer.lr={lr} train.max_steps=3 "
                                      f"run_dir={path}\n")
    return path


def test_runs_are_labelled_by_recipe_and_the_overrides_that_differ(tmp_path):
    a = _fake_run(tmp_path / "a", recipe="galore", lr=0.001, losses=[6.0, 5.5, 5.0], eval_loss=5.25)
    b = _fake_run(tmp_path / "b", recipe="galore", lr=0.003, losses=[6.0, 5.0, 4.5], eval_loss=4.75)
    runs = collect([a, b])
    # train.max_steps=3 and +recipe=galore are shared, so they do not label the runs; the recipe names them
    assert [r.label for r in runs] == ["galore optimizer.lr=0.001", "galore optimizer.lr=0.003"]
    assert table_rows(runs) == [
        ["galore optimizer.lr=0.001", "3", "768", "5.0000", "5.2500", "1,234", "12 MiB", "300 MiB", "1 min 15 s", "finished"],
        ["galore optimizer.lr=0.003", "3", "768", "4.5000", "4.7500", "1,234", "12 MiB", "300 MiB", "1 min 15 s", "finished"],
    ]
    assert runs[0].domains == ["code", "prose"]


def test_the_html_page_embeds_every_figure_and_the_markdown_links_them(tmp_path):
    runs = collect([_fake_run(tmp_path / "a", recipe="lisa", lr=0.001, losses=[6.0, 5.0], eval_loss=5.1),
                    _fake_run(tmp_path / "b", recipe="apollo", lr=0.001, losses=[6.0, 5.2], eval_loss=5.3)])
    html_path, md_path = write_report(runs, tmp_path / "out")
    page = html_path.read_text()
    images = re.findall(r'<img class="figure" id="fig-(\w+)"[^>]*src="data:image/png;base64,([^"]+)"', page)
    assert [name for name, _ in images] == ["loss", "eval_loss", "lr_throughput"]
    assert all(base64.b64decode(data).startswith(PNG) for _, data in images)
    assert "src=\"http" not in page and "<script" not in page      # self-contained: nothing fetched, nothing run
    assert page.count("<tr>") == 1 + 2                               # header + one row per run
    markdown = md_path.read_text()
    assert "| lisa | 2 | 512 | 5.0000 | 5.1000 |" in markdown
    for name in ("loss", "eval_loss", "lr_throughput"):
        assert f"![{name}]({name}.png)" in markdown
        assert (tmp_path / "out" / f"{name}.png").read_bytes().startswith(PNG)


def test_bad_report_input_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for args, message in [([str(tmp_path / "missing")], "does not exist"),
                          ([str(tmp_path / "empty")], "holds no run (no metrics.jsonl or summary.json)"),
                          ([], "name run directories or a sweep root"),
                          ([str(tmp_path / "empty"), "--colour"], "unknown option '--colour'")]:
        result = effitrain_cli("report", *args, timeout=120)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_an_unknown_sweep_config_is_named_with_the_valid_ones(tmp_path):
    result = effitrain_cli("-m", "+sweep=recipes_x_lrr", f"run_dir={tmp_path / 'sw'}", timeout=120)
    assert result.returncode == 2
    assert "sweep: unknown sweep 'recipes_x_lrr' (did you mean 'recipes_x_lr'?)" in result.stderr
    assert not (tmp_path / "sw").exists()


def test_every_member_of_a_sweep_config_grid_is_validated_before_any_runs(tmp_path):
    """The grid lives in configs/sweep/recipes_x_lr.yaml, not on the command line; GaLore (one of its recipes)
    with ZeRO-3 is refused before the first member starts."""
    result = effitrain_cli("-m", "+sweep=recipes_x_lr", "parallelism=zero3", f"run_dir={tmp_path / 'sw'}",
                           timeout=120)
    assert result.returncode == 2
    assert "galore" in result.stderr.lower() and "zero" in result.stderr.lower()
    assert not (tmp_path / "sw").exists()


@pytest.fixture(scope="module")
def browser_pages(tmp_path_factory):
    """Reports the browser test opens besides its own: the real 2x2 sweep's, when that test ran in this module."""
    return tmp_path_factory.mktemp("browser-pages")


def _member_dirs(root: Path) -> list[Path]:
    return [Path(m["dir"]) for m in json.loads((root / "sweep.json").read_text())["members"]]


@pytest.mark.slow
def test_a_two_by_two_sweep_gives_four_runs_and_a_report_with_four_rows(tmp_path, browser_pages):
    root = tmp_path / "sweep"
    result = effitrain_cli("-m", "+sweep=recipes_x_lr", *TINY, f"run_dir={root}", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    members = _member_dirs(root)
    assert len(members) == 4 and all((m / "summary.json").is_file() for m in members)
    assert "curves and table: effitrain report" in result.stdout  # each run's last line points at the report

    result = effitrain_cli("report", str(root))
    assert result.returncode == 0, result.stderr
    page = (root / "report" / "report.html").read_text()
    rows = re.findall(r"<tr><td>([^<]+)</td>", page)
    assert sorted(rows) == ["apollo optimizer.lr=0.003", "apollo optimizer.lr=0.01",
                            "galore optimizer.lr=0.003", "galore optimizer.lr=0.01"]
    assert page.count("data:image/png;base64,") == 3
    shutil.copytree(root / "report", browser_pages / "sweep")


@pytest.mark.slow
def test_the_optuna_search_minimises_the_members_final_eval_loss(tmp_path):
    root = tmp_path / "search"
    result = effitrain_cli("-m", "+sweep=lr_search", "hydra.sweeper.n_trials=2", *TINY, f"run_dir={root}",
                           env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [json.loads((m / "summary.json").read_text())["final_eval_loss"] for m in _member_dirs(root)]
    best = yaml.safe_load((root / "optimization_results.yaml").read_text())
    assert len(losses) == 2 and best["best_value"] == pytest.approx(min(losses))
    assert len(set(losses)) == 2  # two different learning rates were tried


# ------------------------------------------------------------------------------------------ a real browser
def _headless_chromium():
    """Debian's Chromium and chromedriver driven by Selenium (.ci/run installs them); None and why otherwise."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None, "selenium is not installed (the dev extra)"
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        return None, "no Chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options), None


@pytest.mark.slow
def test_the_reports_open_in_a_headless_browser_without_console_errors(tmp_path, browser_pages):
    browser, why = _headless_chromium()
    if browser is None:
        pytest.skip(why)
    single = _fake_run(tmp_path / "single", recipe="lisa", lr=0.001, losses=[6.0, 5.5, 5.0], eval_loss=5.1)
    pages = [write_report(collect([single]), tmp_path / "single-report")[0]]
    if (browser_pages / "sweep" / "report.html").is_file():  # the real 2x2 sweep's report, when it ran first
        pages.append(browser_pages / "sweep" / "report.html")
    else:
        runs = [_fake_run(tmp_path / f"m{i}", recipe=r, lr=lr, losses=[6.0, 5.0 + i / 10], eval_loss=5.0 + i / 10)
                for i, (r, lr) in enumerate([("galore", 0.003), ("galore", 0.01), ("apollo", 0.003), ("apollo", 0.01)])]
        pages.append(write_report(collect(runs), tmp_path / "sweep-report")[0])
    try:
        for page in pages:
            browser.get(page.resolve().as_uri())
            assert browser.title == "effitrain report"
            widths = browser.execute_script(
                "return Array.from(document.images).map(i => i.complete ? i.naturalWidth : -1)")
            assert len(widths) == 3 and all(w > 0 for w in widths), (page, widths)  # every figure decoded
            errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
            assert errors == [], (page, errors)
    finally:
        browser.quit()
