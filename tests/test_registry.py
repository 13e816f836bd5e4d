"""Out-of-tree methods arrive through the `mugbench.methods` entry-point group."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

PLUGIN = textwrap.dedent('''
    import torch
    from mugbench.method import Method
    from mugbench.registry import register_method

    @register_method("plugdemo")
    class PlugDemo(Method):
        """A plugin method living outside mugbench."""

        def forward(self, batch):
            loss = self.encoder.forward_features(batch["image"]).pow(2).mean()
            return {"loss": loss}
''')


def _installed_plugin(root, module: str, source: str) -> None:
    """A minimal installed distribution: a module plus dist-info declaring the entry point."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[mugbench.methods]\n{module} = {module}\n")


def _methods_seen(root) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root), HF_HUB_OFFLINE="1")
    code = "from mugbench.registry import registered_methods; print(sorted(registered_methods()))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_entry_point_plugin_is_registered(tmp_path):
    _installed_plugin(tmp_path, "plugdemo_pkg", PLUGIN)
    proc = _methods_seen(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "'plugdemo'" in proc.stdout and "'mae'" in proc.stdout


def test_broken_plugin_warns_and_keeps_builtins(tmp_path):
    _installed_plugin(tmp_path, "broken_pkg", "raise ImportError('missing dependency xyz')\n")
    proc = _methods_seen(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "'mae'" in proc.stdout and "broken_pkg" in proc.stderr and "xyz" in proc.stderr


def test_readme_method_example_is_a_working_method(smoke_cfg, spec, toy_samples, tokenizer):
    """The README's add-a-method file, executed as is, satisfies the contract."""
    import re
    import types
    from pathlib import Path

    import torch

    from conftest import make_batch
    from mugbench import registry
    from mugbench.runs import build_method

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    source = re.search(r"```python\n(# methods/.*?)```", readme, re.S).group(1)
    name = re.search(r'@register_method\("(\w+)"\)', source).group(1)
    module = sys.modules["readme_method"] = types.ModuleType("readme_method")  # dataclasses look it up
    try:
        exec(compile(source, "README.md", "exec"), module.__dict__)
        method = build_method(name, smoke_cfg, spec)
        assert len(method.extra_views) == 1 and method.base_view is None  # the study's base view + one
        out = method(make_batch(type(method), toy_samples[:8], tokenizer, smoke_cfg.encoder.img_size))
        assert torch.isfinite(out["loss"])
        out["loss"].backward()
    finally:
        registry.METHODS.unregister(name)
        sys.modules.pop("readme_method", None)
