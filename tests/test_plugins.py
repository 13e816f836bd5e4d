"""Issue 17's acceptance: a package outside the tree adds a method, a protocol and an evaluation set
through entry points alone, and `mugbench run` / `mugbench report` use them without touching the repo.

The package is the README's own examples ("Add a method", "Add a protocol or an evaluation set"),
extracted from README.md, so the README stays a working recipe. It is installed the way pip leaves a
package on disk: the modules plus a ``*.dist-info`` whose ``entry_points.txt`` comes from the README's
``pyproject.toml`` tables, on PYTHONPATH.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "my_plugins"


def readme_plugin_sources() -> dict[str, str]:
    """Module name -> source of every README example file: the method's (``# methods/X.py``, which the
    README places in ``my_plugins/`` out of the tree) and the protocol's and set's (``# my_plugins/X.py``)."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(# (?:methods|my_plugins)/(\w+)\.py\n.*?)```", text, re.S)
    return {module: source for source, module in blocks}


def readme_entry_points() -> dict[str, dict[str, str]]:
    """Entry-point group -> {name: module} from the README's ``[project.entry-points."..."]`` tables."""
    text = (REPO / "README.md").read_text()
    groups: dict[str, dict[str, str]] = {}
    for block in re.findall(r"```toml\n(.*?)```", text, re.S):
        for group, entries in tomllib.loads(block).get("project", {}).get("entry-points", {}).items():
            groups.setdefault(group, {}).update(entries)
    return groups


def install_readme_plugins(site: Path) -> dict[str, dict[str, str]]:
    """Write the README's examples as package ``my_plugins`` under ``site`` with a dist-info declaring
    the README's entry points; returns those entry points."""
    sources, groups = readme_plugin_sources(), readme_entry_points()
    assert set(groups) == {"mugbench.methods", "mugbench.protocols", "mugbench.eval_sets"}, groups
    (site / PACKAGE).mkdir(parents=True)
    (site / PACKAGE / "__init__.py").write_text('"""The README\'s plugin examples."""\n')
    for module, source in sources.items():
        (site / PACKAGE / f"{module}.py").write_text(source)
    for entries in groups.values():  # every declared module is one of the README's files
        for target in entries.values():
            assert target.startswith(f"{PACKAGE}.") and target.split(".", 1)[1] in sources, target
    info = site / f"{PACKAGE}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in entries.items()) + "\n"
        for group, entries in groups.items()))
    return groups


def registered_name(source: str, decorator: str) -> str:
    """The name a README example registers with ``@<decorator>("name")``."""
    return re.search(rf'@{decorator}\("([\w-]+)"\)', source).group(1)


def mugbench(*args, cwd: Path, site: Path, cache: Path) -> subprocess.CompletedProcess:
    """The console entry point in a fresh process that sees the plugin package only through PYTHONPATH."""
    env = dict(os.environ, PYTHONPATH=str(site), MUGBENCH_CACHE=str(cache), HF_HUB_OFFLINE="1")
    env.pop("MUGBENCH_DATA", None)
    return subprocess.run([sys.executable, "-m", "mugbench.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_readme_plugins_run_and_report_through_entry_points_only(tmp_path):
    """The README's method, protocol and set, installed outside the tree, train, evaluate and get their
    own report column, with the protocol's option set from the command line; nothing lands in the repo."""
    site, work, cache = tmp_path / "site", tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    install_readme_plugins(site)
    sources = readme_plugin_sources()
    method = registered_name(sources["byol_lite"], "register_method")
    protocol = registered_name(sources["centroid"], "register_protocol")
    small = registered_name(sources["toy_small"], "register_eval_set")
    label = re.search(r'"classification", "([^"]+)"', sources["centroid"]).group(1)
    assert (method, protocol, small, label) == ("byol_lite", "centroid", "toy-cls-small", "nearest centroid")
    # None of them is part of mugbench itself: they can only arrive through the entry points.
    assert not any((REPO / d / f"{m}.py").exists() for d in ("methods", "benchmark/protocols", "benchmark/evalsets")
                   for m in sources)
    results, reports = tmp_path / "results", tmp_path / "reports"
    dirs = ["--cache-dir", str(cache), "--workdir", str(tmp_path / "runs"), "--results", str(results)]

    proc = mugbench("run", "--preset", "smoke", "--methods", f"mae,{method}", "--evals", f"knn,{protocol}",
                    "--set", f"eval.datasets=[toy-cls,{small}]", "--set", f"eval.{protocol}.normalize=false",
                    *dirs, "--reports", str(tmp_path / "run-reports"), cwd=work, site=site, cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]

    records = {(r["method"], r["protocol"], r["dataset"]): r
               for r in (json.loads(f.read_text()) for f in results.rglob("*.json"))}
    expected = {(m, p, d) for m in ("mae", method) for p in ("knn", protocol) for d in ("toy-cls", small)}
    assert set(records) == expected
    for m in ("mae", method):
        for d in ("toy-cls", small):
            centroid = records[(m, protocol, d)]
            assert 0.0 <= centroid["metrics"]["top1"] <= 100.0
            assert centroid["protocol_options"]["normalize"] is False  # eval.centroid.normalize from --set
    # The smoke preset's 64 validation images: top-1 is a multiple of 100/64 on toy-cls and of 100/32
    # on the plugin set, whose 32-image val split is what the protocols read.
    for d, n in (("toy-cls", 64), (small, 32)):
        top1 = records[("mae", protocol, d)]["metrics"]["top1"]
        assert abs(top1 * n / 100 - round(top1 * n / 100)) < 1e-6, (d, top1)

    proc = mugbench("report", "--results", str(results), "--reports", str(reports), cwd=work, site=site, cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = next(line for line in (reports / "summary.md").read_text().splitlines() if line.startswith("| paradigm"))
    assert f"{label} top1 ({small})" in header and f"{label} top1 (toy-cls)" in header
    assert f"k-NN top1 ({small})" in header  # the plugin set serves the built-in protocols too

    # Everything the two commands wrote is under tmp_path; the repo's own folders got nothing.
    assert not any(p.is_relative_to(REPO) for p in (site, work, cache, results, reports))
    assert not list(REPO.glob(f"results/**/{method}")) and not list(REPO.glob(f"runs/**/{method}*"))
    assert not list(work.iterdir())  # the cwd stays empty: every output folder was given explicitly


def test_readme_contract_test_line_passes_on_the_readme_plugins(tmp_path):
    """The README's one-line contract test file, in the plugin package's own test run, collects one check
    per plugin and passes on the README's method, protocol and set."""
    site, pkg_tests = tmp_path / "site", tmp_path / "plugin_tests"
    install_readme_plugins(site)
    line = re.search(r"`(from mugbench\.testing import contract_tests;[^`]*)`", (REPO / "README.md").read_text()).group(1)
    pkg_tests.mkdir()
    (pkg_tests / "test_contract.py").write_text(line + "\n")
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", "test_contract.py"],
                          cwd=pkg_tests, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    passed = sorted(re.findall(r"PASSED test_contract\.py::test_contract\[(\S+)\]", proc.stdout))
    assert passed == ["eval_set:toy-cls-small", "method:byol_lite", "protocol:centroid"], proc.stdout[-2000:]
