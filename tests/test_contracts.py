"""The contract kit (`mugbench.testing`): every registered method, protocol and evaluation set passes it,
a plugin package's one-line test file runs it, and deliberately broken plugins fail it (and a study with
one is refused before training) with a message naming what is missing."""
from __future__ import annotations

import contextlib
import sys
import textwrap

import pytest
import torch

from mugbench.cli import main
from mugbench.method import Method
from mugbench.protocol import Protocol, ProtocolResult
from mugbench.registry import (EVAL_SETS, METHODS, PROTOCOLS, registered_eval_sets, registered_methods,
                               registered_protocols)
from mugbench.testing import check_eval_set, check_method, check_protocol, contract_tests

pytest_plugins = ["pytester"]  # the one-line plugin test file is run by pytest itself

# One test per registered plugin, all in the default tier: the checks run on a few dozen toy images and
# cut the costly protocols down (`mugbench.testing.CHECK_OPTIONS`), about 15 s together on 2 CPU cores.
test_contract = contract_tests(methods=registered_methods(), protocols=registered_protocols(),
                               eval_sets=registered_eval_sets())


@contextlib.contextmanager
def registered(registry, name: str, cls: type):
    """``cls`` registered in ``registry`` as ``name`` for the block (a throw-away plugin), forgotten after."""
    registry.register(name)(cls)
    try:
        yield cls
    finally:
        registry.unregister(name)


def _features_loss(method: Method, batch: dict) -> torch.Tensor:
    return method.encoder.forward_features(batch["image"]).pow(2).mean()


class NoMaskRatio(Method):
    """Reconstructs, but its options do not say how much it masks."""

    paradigm = "single-modal generative"

    def forward(self, batch):
        """A loss that trains the encoder."""
        return {"loss": _features_loss(self, batch)}

    def reconstruct(self, images):
        """The input for every picture, nothing removed."""
        mask = torch.zeros(len(images), 1, *images.shape[-2:])
        return {"masked": images, "reconstruction": images, "pasted": images, "pixel_mask": mask}


class NoLoss(Method):
    """Names its loss ``recon`` only."""

    paradigm = "single-modal generative"

    def forward(self, batch):
        """The loss under the wrong key."""
        return {"recon": _features_loss(self, batch)}


class BadCaption(Method):
    """Captions as one string instead of one per image."""

    paradigm = "multi-modal generative"

    def forward(self, batch):
        """A loss that trains the encoder."""
        return {"loss": _features_loss(self, batch)}

    def caption(self, images, tokenizer, **kwargs):
        """All captions joined."""
        return "a circle"


class SplitScoring(Method):
    """Scores texts one way through score_text and another through its encode-once path."""

    paradigm = "multi-modal generative"

    def forward(self, batch):
        """A loss that trains the encoder."""
        return {"loss": _features_loss(self, batch)}

    def score_text(self, images, text):
        """Each text scored by its image's mean pixel."""
        return images.mean((1, 2, 3)).repeat_interleave(len(text) // len(images))

    def scoring_memory(self, images):
        """The mean pixels plus one: not what score_text reads (the bug)."""
        return images.mean((1, 2, 3)) + 1

    def score_text_with_memory(self, memory, text):
        """The memory, repeated per text."""
        return memory.repeat_interleave(len(text) // len(memory))


class CoupledInForward(Method):
    """A contrast between the rows of a batch computed in forward, with no features / loss split: plain
    accumulation would contrast each micro-batch with itself only."""

    paradigm = "single-modal discriminative"

    def forward(self, batch):
        """InfoNCE of each row's class token against the others'."""
        z = torch.nn.functional.normalize(self.encoder.forward_features(batch["image"])[:, 0], dim=-1)
        logits = z @ z.T / 0.1
        return {"loss": torch.nn.functional.cross_entropy(logits, torch.arange(len(z)))}


class LocalTokenMean(Method):
    """A per-row loss averaged over a count that differs from micro-batch to micro-batch (each row weighs
    as many times as its caption has tokens), divided by the micro-batch's own count."""

    paradigm = "multi-modal generative"
    needs_text = True

    def forward(self, batch):
        """Squared features weighted by each row's token count, over the micro-batch's tokens."""
        tokens = (batch["text"] != 0).sum(1).float()
        per_row = self.encoder.forward_features(batch["image"]).pow(2).mean((1, 2))
        return {"loss": (per_row * tokens).sum() / tokens.sum()}


class NoRun(Protocol):
    """Declares everything but ``run``."""

    reads, set_kind, headline = "features", "classification", ("top1",)


class NoHeadline(Protocol):
    """Reports a metric, but not the one its headline names."""

    reads, set_kind, headline = "features", "classification", ("top1",)

    def run(self, subject, data, options, ctx):
        """The mean feature norm only."""
        return ProtocolResult({"mean_norm": float(subject.val.norm(dim=1).mean())}, {})


class NaNMetric(Protocol):
    """Reports its headline as NaN."""

    reads, set_kind, headline = "features", "classification", ("top1",)

    def run(self, subject, data, options, ctx):
        """top1 = NaN."""
        return ProtocolResult({"top1": float("nan")}, {})


# Per kind of plugin: its registry and its check.
_KINDS = {"Method": (METHODS, check_method), "Protocol": (PROTOCOLS, check_protocol)}


@pytest.mark.parametrize(("kind", "name", "cls", "missing"), [
    ("Method", "broken-mask", NoMaskRatio, "mask_ratio"),
    ("Method", "broken-loss", NoLoss, "no 'loss' tensor from forward(batch)"),
    ("Method", "broken-caption", BadCaption, "from caption(images, tokenizer), not a list of 4 strings"),
    ("Method", "broken-scoring", SplitScoring, "scores differently through score_text_with_memory"),
    ("Method", "broken-coupled", CoupledInForward, "trains other weights with train.accum_steps=4 than with 1"),
    ("Method", "broken-token-mean", LocalTokenMean, "trains other weights with train.accum_steps=4 than with 1"),
    ("Protocol", "broken-run", NoRun, "is not a usable protocol: run() is not implemented"),
    ("Protocol", "broken-headline", NoHeadline,
     "returns no 'top1' among its metrics (mean_norm) though its headline names it"),
    ("Protocol", "broken-nan", NaNMetric, "returns metrics that are not finite numbers: {'top1': nan}"),
])
def test_a_broken_plugin_fails_its_check_naming_the_missing_piece(kind, name, cls, missing):
    registry, check = _KINDS[kind]
    with registered(registry, name, cls), pytest.raises(AssertionError) as err:
        check(name)
    message = str(err.value)
    assert message.startswith(f"{kind} {name!r}") and missing in message, message


def test_a_method_without_mask_ratio_is_refused_for_the_reconstruction_protocol():
    with registered(METHODS, "broken-mask", NoMaskRatio), pytest.raises(AssertionError) as err:
        check_method("broken-mask")
    assert "cannot be evaluated by the 'reconstruction' protocol" in str(err.value)
    assert "NoMaskRatio defines reconstruct() but its Options have no mask_ratio" in str(err.value)


def test_check_eval_set_wants_a_hint_for_a_set_under_the_data_root():
    from mugbench.evalset import EvalSetSource

    class Hintless(EvalSetSource):
        kind, folder, required = "captions", "hintless", ("captions.json",)

        def load(self, ctx):
            raise NotImplementedError

    with registered(EVAL_SETS, "hintless", Hintless), pytest.raises(AssertionError) as err:
        check_eval_set("hintless")
    assert str(err.value) == ("Evaluation set 'hintless' is read from DATA_ROOT/hintless but gives no hint on "
                              "how to get it.")


def test_unregistered_names_fail_with_the_registered_ones_listed():
    for check, known in ((check_method, "mae"), (check_protocol, "knn"), (check_eval_set, "toy-cls")):
        with pytest.raises(AssertionError, match=f"is not registered .*{known}"):
            check("no-such-plugin")


def test_a_study_with_a_method_lacking_mask_ratio_stops_before_training(tmp_path, capsys):
    """The real run path does the same check: `mugbench run` refuses the study before any data is made."""
    argv = ["run", "--preset", "smoke", "--methods", "broken-mask", "--workdir", str(tmp_path / "runs"),
            "--results", str(tmp_path / "results"), "--reports", str(tmp_path / "reports"),
            "--cache-dir", str(tmp_path / "cache")]
    with registered(METHODS, "broken-mask", NoMaskRatio):
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Method 'broken-mask' cannot be evaluated by the 'reconstruction' protocol" in err and "mask_ratio" in err
    assert not any(tmp_path.iterdir())  # no runs, no toy world, no records


def test_reconstruction_left_out_lets_the_study_through_its_checks():
    """The refusal is the reconstruction protocol's: without it the same method passes `check_study`."""
    from mugbench.config import ConfigError, load_config
    from mugbench.preflight import check_study

    with registered(METHODS, "broken-mask", NoMaskRatio):
        with pytest.raises(ConfigError, match="mask_ratio"):
            check_study(load_config("smoke"), ["broken-mask"], None)
        check_study(load_config("smoke", ["eval.protocols=[knn]"]), ["broken-mask"], None)


PLUGIN = textwrap.dedent('''
    import torch
    from mugbench.method import Method
    from mugbench.registry import register_method

    @register_method("plugdemo")
    class PlugDemo(Method):
        """A plugin method living outside mugbench."""

        paradigm = "single-modal generative"

        def forward(self, batch):
            return {"loss": self.encoder.forward_features(batch["image"]).pow(2).mean()}
''')


def test_a_plugin_package_tests_its_contract_in_one_line(pytester):
    """The module docstring's one-line test file, collected by pytest in a plugin's own folder: one test
    per check, each passing."""
    pytester.makepyfile(plugdemo=PLUGIN, test_plugdemo=(
        "import plugdemo; from mugbench.testing import contract_tests; "
        "test_contract = contract_tests(methods=['plugdemo'], protocols=['knn'], eval_sets=['toy-cls'])\n"))
    pytester.syspathinsert()
    try:
        result = pytester.runpytest_inprocess("-v", "-p", "no:cacheprovider")
    finally:
        METHODS.unregister("plugdemo")
        sys.modules.pop("plugdemo", None)
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*test_contract?method:plugdemo? PASSED*", "*test_contract?protocol:knn? PASSED*",
                                 "*test_contract?eval_set:toy-cls? PASSED*"])
