"""Contract tests for plugin authors: is my method, protocol or evaluation set one mugbench can run?

Each check is a plain function that builds its own tiny inputs (the ``smoke`` preset, a toy world of a
few dozen images generated once per process in a temporary folder) and raises an `AssertionError`
whose message names the plugin and the missing piece:

- `check_method` (name): registered; options parse with their defaults; ``paradigm`` and declared
  views valid; ``forward`` gives a finite scalar ``loss`` whose gradient reaches the encoder (on a batch
  with ``label`` too, which ``needs_labels`` methods read); ``after_step`` runs; a method that declares
  ``pretrains=False`` is instead checked to keep the encoder it was given exactly as initialised; every
  capability it defines works on a small batch; no registered protocol that applies to it finds anything
  missing (`Protocol.method_problems`); and accumulation is exact (`check_accumulation`): 8 steps of the
  real trainer with ``accum_steps=4`` train the same weights (relative 1e-4) and log the same loss curve
  (relative 1e-5) as ``accum_steps=1``, which fails a loss that couples rows without declaring a
  ``features`` / ``loss`` split, or divides by a count of the micro-batch's own.
- `check_protocol` (name): the class is well formed (`mugbench.protocol.problems_of`); its options
  parse from ``{}`` and round-trip through a study file (``eval.<name>.<option>``); it runs through
  the real harness (`mugbench.eval.harness.evaluate`) on a small generated set of its kind and returns
  finite metrics that include its ``headline``.
- `check_eval_set` (name): registered; ``kind`` valid; a set read from the data root has a ``hint``
  and says where it looked when missing; a generated set loads into its typed set.

A plugin package's whole contract test file is one line (the plugin registered by importing it, or
installed with its entry point); pytest collects one test per check and name, with ids
``method:NAME``, ``protocol:NAME`` and ``eval_set:NAME``::

    from mugbench.testing import contract_tests; test_contract = contract_tests(methods=["mymethod"])

``contract_tests(methods=..., protocols=..., eval_sets=..., options=..., slow=...)``: ``options`` shrinks
an expensive protocol for its check (``{"myproto": {"iters": 2}}``; the built-ins' are `CHECK_OPTIONS`),
``slow`` names checks (``"protocol:myproto"``) to mark ``@pytest.mark.slow``. Without pytest, call the
checks directly: ``check_protocol("myproto", options={"iters": 2}, method="mug")`` runs a protocol that
reads the method on the named one (default: the first registered method it applies to).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

# The toy world every check reads: the smoke preset's splits cut to a few dozen images, so that
# generating them (about half a second) and one protocol pass over them take seconds on a laptop CPU.
TOY_SIZES = {"pretrain": 32, "cls-train": 32, "cls-val": 16, "caps-val": 8, "seg-train": 16, "seg-val": 8}
BATCH = 4  # images per capability call

# The built-in protocols whose full smoke options still train for a while, cut down for a check that
# only asks "does it run and report its metrics" (plugins pass their own through ``options``).
CHECK_OPTIONS: dict[str, dict[str, Any]] = {
    "linear": {"epochs": 2},
    "finetune": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0},
    "segmentation": {"iters": 4, "batch_size": 4, "warmup_iters": 1},
    "zeroshot": {"images": 4},
    "captioning": {"max_len": 8},
    "reconstruction": {"figure_images": 2},
}
# The keys `mugbench.eval.reconstruction` reads from ``reconstruct(images)``, each image-shaped except
# the pixel mask (one channel).
RECONSTRUCT_KEYS = ("masked", "reconstruction", "pasted", "pixel_mask")


def tiny_config(overrides: Iterable[str] = ()):
    """The smoke study with its toy world cut to `TOY_SIZES`, ``overrides`` (``key=value``) applied after."""
    from .config import load_config

    sizes = ", ".join(f"{k}: {v}" for k, v in TOY_SIZES.items())
    # Shards of 8: the 32 pre-training samples fill the smoke preset's 4 streams (data.streams), a shard each.
    return load_config("smoke", [f"data.toy_sizes={{{sizes}}}", "data.toy_shard_size=8", *overrides])


@dataclass
class Toy:
    """Everything the checks share: the `tiny_config` study, the temporary ``folder`` its generated
    world is cached in, pre-training ``samples`` in memory and the ``tokenizer`` over their captions."""

    cfg: Any
    folder: tempfile.TemporaryDirectory  # removed with this object, at the latest at interpreter exit
    samples: list
    tokenizer: Any

    @property
    def cache_dir(self) -> Path:
        """The cache folder evaluation sets are generated into."""
        return Path(self.folder.name)

    def spec(self, cfg=None):
        """The `TextSpec` methods are built with."""
        from .data.pretrain import text_spec

        return text_spec(cfg or self.cfg, self.tokenizer)


@functools.lru_cache(maxsize=1)
def toy() -> Toy:
    """The shared tiny inputs, built on first use and kept for the process."""
    from .data.tokenizer import TextTokenizer, corpus_vocab
    from .data.toy import ToyWorld

    cfg = tiny_config()
    world = ToyWorld(seed=cfg.data.toy_seed)
    samples = [world.sample("pretrain", i) for i in range(2 * BATCH)]
    tokenizer = TextTokenizer(cfg.text.context_length, corpus_vocab(c for s in samples for c in s.captions))
    return Toy(cfg, tempfile.TemporaryDirectory(prefix="mugbench-contract-"), samples, tokenizer)


def tiny_batch(method_cls: type, samples: list, tokenizer, image_size: int, augment, seed: int = 0) -> dict:
    """A batch in the loader's format (``image``, ``text``, ``caption``, ``label`` and, with extra views,
    ``image_views``) for the views ``method_cls`` trains on under the study's base-view policy."""
    from .data.transforms import build_view_transform, method_view_specs

    torch.manual_seed(seed)
    views = [torch.stack([build_view_transform(v, image_size)(s.image) for s in samples])
             for v in method_view_specs(method_cls, augment)]
    captions = [s.captions[0] for s in samples]
    batch = {"image": views[0], "text": tokenizer(captions), "caption": captions,
             "label": torch.tensor([s.label for s in samples])}
    if len(views) > 1:
        batch["image_views"] = views
    return batch


def _fail(who: str, what: str, exc: BaseException | None = None) -> AssertionError:
    """One-sentence failure naming the plugin; the cause, if any, appended."""
    cause = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return AssertionError(f"{who} {what}{cause}.")


def _registered(who: str, get: Callable[[str], Any], name: str, base: type) -> type:
    """The class ``get`` (a registry's lookup) finds under ``name``, checked to subclass ``base``."""
    from .registry import UnknownNameError

    try:
        cls = get(name)
    except UnknownNameError as exc:
        raise _fail(who, "is not registered", exc) from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise _fail(who, f"is registered as {cls!r}, which is not a subclass of {base.__module__}.{base.__qualname__}")
    return cls


# --------------------------------------------------------------------------- methods

def check_method(name: str) -> None:
    """The method ``name`` satisfies the method contract; an `AssertionError` naming it and the missing
    piece otherwise."""
    from .method import Method
    from .registry import get_method

    who = f"Method {name!r}"
    cls = _registered(who, get_method, name, Method)
    _check_method_class(who, cls)
    _check_protocol_needs(who, cls)
    method, batch = _check_training(who, name, cls)
    _check_capabilities(who, method, batch)
    if cls.pretrains:
        check_accumulation(name)


def _check_method_class(who: str, cls: type) -> None:
    """Declarations: options with defaults, a paradigm, usable views."""
    from .data.transforms import ViewSpec, method_view_specs
    from .method import METHOD_PARADIGMS

    if not dataclasses.is_dataclass(cls.Options):
        raise _fail(who, "has an Options that is not a dataclass")
    try:
        cls.parse_options({})
    except Exception as exc:  # noqa: BLE001 - any failure of the defaults is the finding
        raise _fail(who, "has Options that do not build from their defaults", exc) from None
    if cls.paradigm not in METHOD_PARADIGMS:
        raise _fail(who, f"declares paradigm {cls.paradigm!r}, not one of {', '.join(METHOD_PARADIGMS)}")
    try:
        views = method_view_specs(cls, toy().cfg.data.augment)
    except Exception as exc:  # noqa: BLE001
        raise _fail(who, "declares views mugbench cannot use", exc) from None
    bad = [v for v in views if not isinstance(v, ViewSpec)]
    if bad:
        raise _fail(who, f"declares a view {bad[0]!r} that is not a mugbench.data.transforms.ViewSpec")


def _check_protocol_needs(who: str, cls: type) -> None:
    """Every registered protocol that applies to the method finds what its run will need."""
    from .registry import registered_protocols

    for pname, protocol in registered_protocols().items():
        if protocol.applies_to(cls):
            problems = protocol.method_problems(cls)
            if problems:
                raise _fail(who, f"cannot be evaluated by the {pname!r} protocol: {'; '.join(problems)}")


def _check_training(who: str, name: str, cls: type):
    """Built around the shared encoder, one forward and backward, then ``after_step``; a method that is not
    pre-trained (``pretrains=False``) is never called by the trainer, so only its build is checked."""
    from timm.models.vision_transformer import VisionTransformer

    from .models.vit import build_encoder

    t = toy()
    encoder = build_encoder(t.cfg.encoder, seed=t.cfg.seed)
    try:
        method = cls.build(encoder, t.spec(), t.cfg.methods.get(name))
    except Exception as exc:  # noqa: BLE001
        raise _fail(who, "does not build around the smoke encoder", exc) from None
    if method.encoder is not encoder or not isinstance(method.encoder, VisionTransformer):
        raise _fail(who, "does not keep the shared timm VisionTransformer it was given as .encoder")
    # The loader's batch, ``label`` included (the class of each toy sample, what ``needs_labels`` asks for).
    batch = tiny_batch(cls, t.samples, t.tokenizer, t.cfg.encoder.img_size, t.cfg.data.augment)
    if not cls.pretrains:
        _check_untouched(who, method.encoder, build_encoder(t.cfg.encoder, seed=t.cfg.seed))
        return method, batch
    try:
        out = method(batch)
    except Exception as exc:  # noqa: BLE001
        raise _fail(who, "fails in forward(batch) on a smoke batch", exc) from None
    loss = out.get("loss") if isinstance(out, dict) else None
    if not isinstance(loss, torch.Tensor):
        raise _fail(who, f"returns no 'loss' tensor from forward(batch) (it returned "
                         f"{sorted(out) if isinstance(out, dict) else type(out).__name__})")
    if loss.ndim != 0 or not torch.isfinite(loss):
        raise _fail(who, f"returns a loss that is not a finite scalar (shape {tuple(loss.shape)}, value "
                         f"{loss.detach().flatten()[:4].tolist()})")
    try:
        loss.backward()
    except Exception as exc:  # noqa: BLE001
        raise _fail(who, "returns a loss that does not backpropagate", exc) from None
    if not any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.encoder.parameters()):
        raise _fail(who, "returns a loss whose gradient does not reach the encoder")
    try:
        returned = method.after_step()
    except Exception as exc:  # noqa: BLE001
        raise _fail(who, "fails in after_step()", exc) from None
    if returned is not None:
        raise _fail(who, f"returns {returned!r} from after_step(), which the trainer ignores; return None")
    return method, batch


# Accumulation check: 8 steps of a global batch of 8 rows, in 4 micro-batches of 2 against 1 batch of 8.
ACCUM_STEPS, ACCUM_TRAIN_STEPS = 4, 8
WEIGHT_RTOL, LOSS_RTOL = 1e-4, 1e-5


def check_accumulation(name: str, accum_steps: int = ACCUM_STEPS, steps: int = ACCUM_TRAIN_STEPS) -> None:
    """``steps`` optimiser steps of method ``name`` in the real trainer with ``accum_steps`` micro-batches
    per step give the same weights (all parameters as one vector, within `WEIGHT_RTOL`) and the same
    logged loss curve (`LOSS_RTOL`) as one batch per step; an `AssertionError` naming the method, the
    tensor or step that differ and what to change otherwise."""
    who = f"Method {name!r}"
    one = train_tiny(name, 1, steps)
    split = train_tiny(name, accum_steps, steps)
    hint = ("a loss that couples the rows of a batch (a contrast, batch statistics) must be split into "
            "features(batch) and loss(features); a mean whose count varies per batch must divide by the "
            "step's count (loss_counts and mugbench.models.global_batch.global_mean); random draws must come "
            "from mugbench.models.global_batch.global_batch_rand")
    # Relative to the whole weight vector: a tensor whose gradient is zero up to rounding (an attention key
    # bias, which softmax ignores) moves by Adam's full step in a direction set by that rounding, so tensor
    # by tensor two exact runs may differ by a percent; a micro-batch's contrast or mean shifts every weight.
    diffs = {key: (split["weights"][key] - ref).float() for key, ref in one["weights"].items()}
    norm = sum(float(ref.float().pow(2).sum()) for ref in one["weights"].values()) ** 0.5
    drift = sum(float(d.pow(2).sum()) for d in diffs.values()) ** 0.5
    if drift > WEIGHT_RTOL * max(norm, 1e-12):
        worst = max(diffs, key=lambda key: float(diffs[key].norm()))
        raise _fail(who, f"trains other weights with train.accum_steps={accum_steps} than with 1 after {steps} steps "
                         f"(relative difference {drift / max(norm, 1e-12):.3g}, most in {worst}); {hint}")
    for (step, a), (_, b) in zip(one["loss"], split["loss"]):
        if abs(a - b) > LOSS_RTOL * max(abs(a), 1e-6):
            raise _fail(who, f"logs another loss at step {step} with train.accum_steps={accum_steps} ({b!r}) than "
                             f"with 1 ({a!r}): the logged loss must be the global batch's; {hint}")


def train_tiny(name: str, accum_steps: int, steps: int, info=None) -> dict:
    """Train a fresh method ``name`` for ``steps`` steps of the toy batches (a global batch of `2 * BATCH`
    rows, each step's crops its own) in ``accum_steps`` micro-batches per rank; with ``info`` (a
    `DistInfo` of a process group) on this rank's rows of every global batch. Its weights and its logged
    (step, loss) (rank 0's log)."""
    import json

    from .data.streams import split_rows
    from .models.vit import build_encoder
    from .registry import get_method
    from .train.distributed import DistInfo
    from .train.loop import train

    cls, info, t = get_method(name), info or DistInfo(), toy()
    cfg = dataclasses.replace(t.cfg.train, batch_size=len(t.samples), accum_steps=accum_steps, epochs=1,
                              log_every=1, ckpt_every=10 ** 6, warmup_epochs=0.25)
    global_batches = [tiny_batch(cls, t.samples, t.tokenizer, t.cfg.encoder.img_size, t.cfg.data.augment, seed=i)
                      for i in range(steps)]

    def batches(epoch: int):
        for batch in global_batches:
            yield from split_rows(split_rows(batch, info.world_size)[info.rank], accum_steps)

    method = cls.build(build_encoder(t.cfg.encoder, seed=t.cfg.seed), t.spec(), t.cfg.methods.get(name))
    with tempfile.TemporaryDirectory(prefix="mugbench-accum-") as workdir:
        train(method, batches, cfg, steps_per_epoch=steps, workdir=Path(workdir), info=info, seed=t.cfg.seed,
              desc=f"{name} (accum_steps={accum_steps})")
        log = Path(workdir) / "metrics.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines()] if info.is_main else []
    return {"weights": {k: v.detach().clone() for k, v in method.named_parameters()},
            "loss": [(row["step"], row["loss"]) for row in rows]}


def _check_untouched(who: str, encoder, fresh) -> None:
    """A method evaluated as initialised leaves the shared encoder's weights as `build_encoder` made them."""
    ours, ref = encoder.state_dict(), fresh.state_dict()
    changed = [k for k in ref if k not in ours or not torch.equal(ours[k], ref[k])]
    if changed:
        raise _fail(who, f"declares pretrains=False but changes the encoder it was given (first: {changed[0]!r}), "
                         f"so it would not be evaluated as initialised")


def _check_capabilities(who: str, method, batch: dict) -> None:
    """Each capability the method defines answers a small batch the way the protocols read it."""
    images, text = batch["image"][:BATCH], batch["text"][:BATCH]
    caps = type(method).capabilities()
    method.eval()
    with torch.no_grad():
        for capability in caps:
            try:
                _CAPABILITY_CHECKS[capability](who, method, images, text)
            except AssertionError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise _fail(who, f"fails in {capability}() on {len(images)} smoke images", exc) from None
    if "encode_image" in caps and "encode_text" in caps:
        with torch.no_grad():
            dims = method.encode_image(images).shape[-1], method.encode_text(text).shape[-1]
        if dims[0] != dims[1]:
            raise _fail(who, f"embeds images ({dims[0]}) and texts ({dims[1]}) in spaces of different sizes")


def _embedding(who: str, capability: str, z, rows: int) -> None:
    if not (isinstance(z, torch.Tensor) and z.ndim == 2 and len(z) == rows and torch.isfinite(z).all()):
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise _fail(who, f"returns {shape} from {capability}(), not finite embeddings [{rows}, D]")


def _check_encode_image(who, method, images, text) -> None:
    _embedding(who, "encode_image", method.encode_image(images), len(images))


def _check_encode_text(who, method, images, text) -> None:
    _embedding(who, "encode_text", method.encode_text(text), len(text))


def _check_caption(who, method, images, text) -> None:
    captions = method.caption(images, toy().tokenizer, max_len=8)
    if not (isinstance(captions, list) and len(captions) == len(images) and all(isinstance(c, str) for c in captions)):
        raise _fail(who, f"returns {type(captions).__name__} from caption(images, tokenizer), not a list of "
                         f"{len(images)} strings")


def _check_score_text(who, method, images, text) -> None:
    k = 2  # two candidate texts per image, as zero-shot scores every prompt of every class
    scores = method.score_text(images, text.repeat(k, 1)[:len(images) * k])
    if not (isinstance(scores, torch.Tensor) and scores.shape == (len(images) * k,) and torch.isfinite(scores).all()):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise _fail(who, f"returns {shape} from score_text(images, text) for {k} texts per image, not finite "
                         f"scores [{len(images) * k}]")
    encode, score = getattr(method, "scoring_memory", None), getattr(method, "score_text_with_memory", None)
    if callable(encode) and callable(score):  # the encode-once path zero-shot takes must score as score_text
        texts = text.repeat(k, 1)[:len(images) * k]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            direct = method.score_text(images, texts)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            split = score(encode(images), texts)
        if not torch.allclose(direct, split, rtol=1e-5, atol=1e-6):
            raise _fail(who, "scores differently through score_text_with_memory(scoring_memory(images), text) "
                             "than through score_text(images, text) under the same seed; zero-shot takes the former")


def _check_reconstruct(who, method, images, text) -> None:
    out = method.reconstruct(images)
    missing = [k for k in RECONSTRUCT_KEYS if not isinstance(out, dict) or k not in out]
    if missing:
        raise _fail(who, f"returns no {', '.join(repr(m) for m in missing)} from reconstruct(images) "
                         f"(the reconstruction protocol reads {', '.join(RECONSTRUCT_KEYS)})")
    b, _, h, w = images.shape
    expected = {k: tuple(images.shape) for k in RECONSTRUCT_KEYS} | {"pixel_mask": (b, 1, h, w)}
    for key, shape in expected.items():
        if tuple(out[key].shape) != shape:
            raise _fail(who, f"returns {key!r} of shape {tuple(out[key].shape)} from reconstruct(images), not {shape}")


_CAPABILITY_CHECKS: dict[str, Callable] = {
    "encode_image": _check_encode_image, "encode_text": _check_encode_text, "caption": _check_caption,
    "score_text": _check_score_text, "reconstruct": _check_reconstruct,
}


# --------------------------------------------------------------------------- protocols

def check_protocol(name: str, options: dict[str, Any] | None = None, method: str | None = None) -> None:
    """The protocol ``name`` satisfies the protocol contract; an `AssertionError` naming it and the missing
    piece otherwise.

    ``options`` (default `CHECK_OPTIONS`) shrink an expensive protocol for the run; ``method`` names the
    registered method a method-reading protocol is run on (default: the first it applies to).
    """
    from .protocol import Protocol, problems_of
    from .registry import get_protocol

    who = f"Protocol {name!r}"
    cls = _registered(who, get_protocol, name, Protocol)
    problems = problems_of(cls)
    if problems:
        raise _fail(who, f"is not a usable protocol: {'; '.join(problems)}")
    _check_protocol_options(who, name, cls)
    if not cls.headline:
        raise _fail(who, "declares no headline metrics, so a report's main table would show nothing of it")
    _check_protocol_run(who, name, cls, CHECK_OPTIONS.get(name, {}) if options is None else options, method)


def _yaml(value: Any) -> str:
    """``value`` as one line of YAML for a ``--set`` override."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _check_protocol_options(who: str, name: str, cls: type) -> None:
    """Options parse from ``{}``, and one option set in a study file comes back out of it unchanged."""
    from .config import from_dict

    try:
        defaults = dataclasses.asdict(cls.parse_options({}))
    except Exception as exc:  # noqa: BLE001
        raise _fail(who, "has options that do not parse from {}", exc) from None
    overrides = [f"eval.{name}.{k}={_yaml(v)}" for k, v in list(defaults.items())[:1]]
    try:
        cfg = tiny_config(overrides)
        again = from_dict(cfg.to_dict())
    except Exception as exc:  # noqa: BLE001
        raise _fail(who, f"has options that do not round-trip through a study file ({', '.join(overrides) or '{}'})",
                    exc) from None
    for study in (cfg, again):
        got = dataclasses.asdict(study.eval.options_for(name))
        for key in list(defaults)[:1]:
            if got[key] != defaults[key]:
                raise _fail(who, f"reads eval.{name}.{key}={_yaml(defaults[key])} back as {got[key]!r}")


def _eval_set_for(who: str, kind: str) -> str:
    """A registered generated evaluation set of ``kind`` (the toy ones first)."""
    from .registry import registered_eval_sets

    generated = sorted((not n.startswith("toy-"), n) for n, s in registered_eval_sets().items()
                       if s.kind == kind and s.folder is None)
    if not generated:
        raise _fail(who, f"cannot be checked: no registered evaluation set of kind {kind!r} is generated "
                         f"(all need a data root)")
    return generated[0][1]


def _subject_for(who: str, cls: type, method: str | None, cfg):
    """What the protocol reads: a random-init encoder, or a smoke-size method it applies to."""
    from .models.vit import build_encoder
    from .registry import get_method, registered_methods

    if cls.reads != "method":
        return build_encoder(cfg.encoder, seed=cfg.seed)
    names = [method] if method else [n for n, m in registered_methods().items() if cls.applies_to(m)]
    if not names:
        raise _fail(who, f"cannot be checked: no registered method has any of its needs ({', '.join(cls.needs)})")
    m = get_method(names[0])
    if not cls.applies_to(m):
        raise _fail(who, f"does not apply to method {names[0]!r}, which lacks {', '.join(cls.needs)}")
    encoder = build_encoder(cfg.encoder, seed=cfg.seed)
    torch.manual_seed(cfg.seed + 1)
    return m.build(encoder, toy().spec(cfg), cfg.methods.get(names[0]))


def _check_protocol_run(who: str, name: str, cls: type, options: dict, method: str | None) -> None:
    """One run through the harness on a generated set of the protocol's kind."""
    from .eval.harness import evaluate
    from .evalset import EvalSets

    t = toy()
    dataset = _eval_set_for(who, cls.set_kind)
    overrides = [f"eval.protocols=[{name}]", f"eval.datasets=[{dataset}]",
                 *(f"eval.{name}.{k}={_yaml(v)}" for k, v in options.items())]
    try:
        cfg = tiny_config(overrides)
    except Exception as exc:  # noqa: BLE001
        raise _fail(who, f"rejects the check's options {options}", exc) from None
    subject = _subject_for(who, cls, method, cfg)
    try:
        results = evaluate(subject, cfg, EvalSets(cfg, t.cache_dir), "cpu", tokenizer=t.tokenizer)
    except Exception as exc:  # noqa: BLE001
        raise _fail(who, f"fails to run on {dataset!r}", exc) from None
    if len(results) != 1:
        raise _fail(who, f"gave {len(results)} results on {dataset!r} instead of one")
    metrics = results[0].metrics
    if not isinstance(metrics, dict):
        raise _fail(who, f"returns metrics of type {type(metrics).__name__}, not a dict of numbers")
    missing = [h for h in cls.headline if h not in metrics]
    if missing:
        raise _fail(who, f"returns no {', '.join(repr(m) for m in missing)} among its metrics ({', '.join(metrics)}) "
                         f"though its headline names it")
    bad = {k: v for k, v in metrics.items() if not _finite(v)}
    if bad:
        raise _fail(who, f"returns metrics that are not finite numbers: {bad}")
    if not isinstance(results[0].options, dict):
        raise _fail(who, f"records options of type {type(results[0].options).__name__}, not a dict")


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- evaluation sets

def check_eval_set(name: str) -> None:
    """The evaluation set ``name`` satisfies the source contract; an `AssertionError` naming it and the
    missing piece otherwise. A generated set (``folder`` None) is loaded; a set read from the data root
    must say how to get it and refuse an empty root with that hint."""
    from .data.catalog import DataNotFoundError
    from .evalset import EVAL_SET_TYPES, EvalSets, EvalSetSource
    from .registry import get_eval_set

    who = f"Evaluation set {name!r}"
    cls = _registered(who, get_eval_set, name, EvalSetSource)
    if cls.kind not in EVAL_SET_TYPES:
        raise _fail(who, f"declares kind {cls.kind!r}, not one of {', '.join(EVAL_SET_TYPES)}")
    if cls.load is EvalSetSource.load:
        raise _fail(who, "does not implement load()")
    if cls.folder is not None:
        if not str(cls.hint).strip():
            raise _fail(who, f"is read from DATA_ROOT/{cls.folder} but gives no hint on how to get it")
        with tempfile.TemporaryDirectory() as empty:
            try:
                cls.locate(Path(empty))
            except DataNotFoundError as exc:
                if cls.hint not in str(exc):
                    raise _fail(who, "refuses an empty data root without its hint", exc) from None
            else:
                raise _fail(who, f"is found in an empty data root: required={cls.required!r} marks nothing")
        return
    t = toy()
    try:
        data = EvalSets(t.cfg, t.cache_dir).get(name)
    except Exception as exc:  # noqa: BLE001 - a TypeError names the wrong type loaded
        raise _fail(who, "does not load", exc) from None
    expected = EVAL_SET_TYPES[cls.kind]
    if getattr(data, "name", None) != name:
        raise _fail(who, f"loads a {expected.__name__} named {getattr(data, 'name', None)!r} instead of {name!r}")
    if cls.kind == "classification":
        for role in ("train", "val"):
            split = getattr(data, role)
            if not (len(split.label) and len(split.image) == len(split.label) == len(split.key)):
                raise _fail(who, f"loads a {role} split whose images, labels and keys are empty or do not match")
    elif cls.kind == "captions":
        val = data.val
        if not (len(val.image) and len(val.image) == len(val.captions) == len(val.key) and all(val.captions)):
            raise _fail(who, "loads val images, captions and keys that are empty or do not match")
    elif not Path(data.root).is_dir() or not data.classes:
        raise _fail(who, f"loads a segmentation set without a folder ({data.root}) or class names")


# --------------------------------------------------------------------------- pytest

def contract_tests(methods: Iterable[str] = (), protocols: Iterable[str] = (), eval_sets: Iterable[str] = (), *,
                   options: dict[str, dict[str, Any]] | None = None, slow: Iterable[str] = ()):
    """A pytest test function parametrised over every check: one test per method, protocol and set,
    with ids ``method:NAME``, ``protocol:NAME``, ``eval_set:NAME``. Assign it to a ``test_*`` name in a
    test module. ``options``: per protocol, the options its check runs with (default `CHECK_OPTIONS`);
    ``slow``: ids to mark ``@pytest.mark.slow``."""
    import pytest

    slow, options = set(slow), dict(options or {})
    cases = [(f"method:{n}", check_method, (n,)) for n in methods]
    cases += [(f"protocol:{n}", check_protocol, (n, options.get(n))) for n in protocols]
    cases += [(f"eval_set:{n}", check_eval_set, (n,)) for n in eval_sets]
    params = [pytest.param(check, args, id=cid, marks=[pytest.mark.slow] if cid in slow else [])
              for cid, check, args in cases]

    @pytest.mark.parametrize(("check", "args"), params)
    def test_contract(check, args):
        """One contract check of one plugin."""
        check(*args)

    return test_contract
