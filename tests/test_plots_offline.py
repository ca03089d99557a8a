"""`dvc plots show` works offline: the page it writes draws every chart with no network.

The project's `.dvc/config` names stages/tools/plots_template.html as `plots.html_template`: DVC's page with
vega, vega-lite and vega-embed inlined from vl-convert-python (python -m stages.tools.plots_template).
Here the real `dvc plots show` runs on a copy of the project's plot definitions and DVC config over small
TSVs in the columns the train log and the curves stage write, and a headless Chromium behind a dead proxy
(any CDN load fails) opens the page: each plot must have become a vega view with a line drawn for each
column it plots. DVC's own page, under the same Chromium, draws none (so the check tells offline from
online). Chromium is the Debian package `chromium`; .ci/run installs it. Without it the browser tests skip,
except under CI, where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.curves import COLUMNS as CURVE_COLUMNS
from stages.runtime.common import write_tsv
from stages.runtime.train_log import PLOT_COLUMNS
from stages.tools import plots_template

ROOT = Path(__file__).resolve().parent.parent
DVC = Path(sys.executable).with_name("dvc")  # the venv's dvc, beside the interpreter running pytest
CDN_SCRIPT = re.compile(r"<script\b[^>]*\bsrc\s*=\s*[\"']?\s*(https?:)?//", re.I)


def _template_setting() -> str:
    from configobj import ConfigObj  # what DVC reads its config with

    return ConfigObj(str(ROOT / ".dvc" / "config")).get("plots", {}).get("html_template")


def test_template_is_what_the_pinned_package_gives():
    assert plots_template.TEMPLATE.read_text(encoding="utf-8") == plots_template.render(), (
        "stages/tools/plots_template.html differs from what the installed vl-convert-python gives: "
        "run `python -m stages.tools.plots_template` and commit the file")


def test_config_names_the_template():
    setting = _template_setting()
    assert setting, ".dvc/config has no plots.html_template"
    # DVC takes a relative plots.html_template as relative to .dvc/ (dvc/commands/plots.py)
    assert Path(os.path.normpath(ROOT / ".dvc" / setting)) == plots_template.TEMPLATE
    page = plots_template.TEMPLATE.read_text(encoding="utf-8")
    assert "{plot_divs}" in page and "{scripts}" not in page  # DVC's CDN tags go in at {scripts}
    assert not CDN_SCRIPT.search(page)


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
    if exe is None:
        why = "no Chromium: install the Debian package (apt-get install -y chromium); .ci/run does"
        if os.environ.get("CI"):
            pytest.fail(f"{why} (CI is set, so this is a failure, not a skip)")
        pytest.skip(why)
    return exe


def _env(tmp: Path) -> dict:
    # no user or machine DVC config (a global html_template or out_dir would change what is tested)
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_GLOBAL_CONFIG_DIR": str(tmp / "dvc-global"),
            "DVC_SYSTEM_CONFIG_DIR": str(tmp / "dvc-system"), "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site")}


@pytest.fixture(scope="module")
def plots_repo(tmp_path_factory) -> tuple[Path, int, set]:
    """A DVC repo with the project's plot definitions, DVC config and template, and small plot files;
    returns it, how many plots dvc.yaml defines and the columns they plot."""
    from configobj import ConfigObj

    repo = tmp_path_factory.mktemp("plots")
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False))
    # the config as committed, without git; the template at the same place, so the setting resolves the same
    (repo / ".dvc").mkdir()
    config = ConfigObj(str(ROOT / ".dvc" / "config"))
    config.setdefault("core", {})["no_scm"] = "true"
    config.filename = str(repo / ".dvc" / "config")
    config.write()
    target = repo / plots_template.TEMPLATE.relative_to(ROOT)
    target.parent.mkdir(parents=True)
    shutil.copyfile(plots_template.TEMPLATE, target)

    (repo / "artifacts" / "logs").mkdir(parents=True)
    (repo / "artifacts" / "curves").mkdir(parents=True)
    write_tsv(repo / "artifacts/logs/train.tsv", PLOT_COLUMNS, [
        {"step": s, "loss": 1 / s, "mse": 0.9 / s, "vb": 0.1 / s, "grad_norm": 2 / s, "img_per_s": 100 + s,
         "mfu": 0.3} for s in range(1, 21)])
    metrics = lambda i: {"fid": 50 / i, "sfid": 40 / i, "precision": 0.5, "recall": 0.4}  # noqa: E731
    write_tsv(repo / "artifacts/curves/fid_vs_step.tsv", ("step", "train_gflops", *CURVE_COLUMNS),
              [{"step": 100 * i, "train_gflops": 1e3 * i, **metrics(i)} for i in range(1, 5)])
    write_tsv(repo / "artifacts/curves/fid_vs_sampling.tsv",
              ("sampler", "sampling_steps", "sample_gflops_per_image", *CURVE_COLUMNS),
              [{"sampler": f"dpm++{n}", "sampling_steps": n, "sample_gflops_per_image": 2.5 * n, **metrics(n)}
               for n in (5, 10, 25)])
    ys = {c for p in plots for d in p.values() for cols in d["y"].values()
          for c in ([cols] if isinstance(cols, str) else cols)}
    return repo, len(plots), ys


def _plots_show(repo: Path, *args: str) -> Path:
    r = subprocess.run([str(DVC), "plots", "show", *args], cwd=repo, env=_env(repo.parent),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"dvc plots show {' '.join(args)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    out = Path(args[args.index("-o") + 1]) if "-o" in args else repo / "dvc_plots"
    page = out / "index.html"
    assert page.is_file(), r.stdout + r.stderr
    return page


def _dom(chromium: str, page: Path, profile: Path) -> str:
    """The page's DOM after its scripts ran, in a headless Chromium with every network load failing."""
    r = subprocess.run([
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--no-first-run",
        f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9",  # a dead proxy: nothing loads from a host
        "--virtual-time-budget=10000", "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "</html>" in r.stdout, f"chromium: exit {r.returncode}\n{r.stderr[-3000:]}"
    return r.stdout


def test_dvc_plots_show_draws_offline(plots_repo, chromium, tmp_path):
    repo, n_plots, ys = plots_repo
    page = _plots_show(repo)  # bare, as a user runs it: the template comes from .dvc/config
    html = page.read_text(encoding="utf-8")
    assert not CDN_SCRIPT.search(html), "the page loads a script from the network"
    assert "<script src" not in html.lower() and "window.vegaEmbed" in html  # inlined, not loaded
    dom = _dom(chromium, page, tmp_path / "profile")
    charts = re.findall(r"<(?:svg|canvas)\b[^>]*\bclass=\"marks\"[^>]*>", dom)  # vega's view, svg or canvas
    assert len(charts) == n_plots, f"{len(charts)} charts drawn of {n_plots}:\n{dom[-3000:]}"
    assert all(re.search(r'\bwidth="[1-9]', c) for c in charts), charts  # laid out at a size
    for column in ys:  # each plotted column is a line through its points (vega's svg labels each line)
        assert re.search(rf'aria-label="[^"]*\b{column}\b[^"]*"[^>]*\bd="M[^"]*L', dom), f"no line of {column}"


def test_dvc_default_page_draws_nothing_offline(plots_repo, chromium, tmp_path):
    """The control: DVC's own page (CDN scripts) under the same Chromium draws nothing, so the test above
    would catch a page that needs the network."""
    from dvc_render.html import PAGE_HTML

    repo, _, _ = plots_repo
    default = tmp_path / "dvc_default.html"
    default.write_text(PAGE_HTML, encoding="utf-8")
    page = _plots_show(repo, "-o", str(tmp_path / "default_plots"), "--html-template", str(default))
    html = page.read_text(encoding="utf-8")
    assert CDN_SCRIPT.search(html), "DVC's default page no longer loads vega from a CDN: revisit this test"
    dom = _dom(chromium, page, tmp_path / "profile")
    assert 'class="marks"' not in dom, "a CDN page drew charts: the browser reached the network"
