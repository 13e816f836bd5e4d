"""Text tokenisation: open_clip's BPE (its vocabulary ships in the wheel, so it works offline).

Predicting over the full 49,408-token BPE vocabulary costs ~2 s per step on a 2-core CPU, so a
study may restrict the vocabulary to the BPE ids that occur in its training captions (the
`toy` preset does). Ids are then renumbered compactly; unknown ids map to one `unk` entry.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer

PAD_BPE_ID = 0  # open_clip pads with 0; the loss ignores it (as open_clip's CoCa does)


class TextTokenizer:
    """open_clip BPE tokenizer with an optional compact sub-vocabulary.

    ``__call__`` returns ``[N, context_length]`` ids in the model's vocabulary: start token,
    BPE tokens, end token, then padding.
    """

    def __init__(self, context_length: int = 77, vocab: Sequence[int] | None = None):
        self.bpe = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self._sot_bpe = self.bpe.sot_token_id
        self._eot_bpe = self.bpe.eot_token_id
        if vocab is None:
            self.vocab: list[int] | None = None
            self.vocab_size = len(self.bpe.encoder)
            self._to_compact = None
        else:
            ids = sorted(set(vocab) | {PAD_BPE_ID, self._sot_bpe, self._eot_bpe})
            self.vocab = ids
            self.unk_id = len(ids)
            self.vocab_size = len(ids) + 1
            table = torch.full((len(self.bpe.encoder),), self.unk_id, dtype=torch.long)
            table[torch.tensor(ids)] = torch.arange(len(ids))
            self._to_compact = table
        self.pad_id = self._map(torch.tensor([PAD_BPE_ID])).item()
        self.sot_id = self._map(torch.tensor([self._sot_bpe])).item()
        self.eot_id = self._map(torch.tensor([self._eot_bpe])).item()

    def _map(self, bpe_ids: torch.Tensor) -> torch.Tensor:
        return bpe_ids if self._to_compact is None else self._to_compact[bpe_ids]

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """Tokenise one text or a list of texts to model ids (truncated with an end token)."""
        return self._map(self.bpe(texts, context_length=self.context_length))

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Model ids -> text, stopping at the end token and skipping start/padding."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        ids = [i for i in ids if i not in (self.sot_id, self.pad_id)]
        if self.vocab is None:
            return " ".join(self.bpe.decode(ids).split())
        # Decode runs of known ids in one call each; an id outside the sub-vocabulary is <unk>.
        pieces, run = [], []
        for i in ids:
            if i < len(self.vocab):
                run.append(self.vocab[i])
                continue
            pieces += [self.bpe.decode(run), " <unk> "]
            run = []
        pieces.append(self.bpe.decode(run))
        return " ".join("".join(pieces).split())

    def to_json(self) -> dict:
        """Enough to rebuild the same tokenizer (stored in checkpoints)."""
        return {"context_length": self.context_length, "vocab": self.vocab}

    @classmethod
    def from_json(cls, data: dict) -> "TextTokenizer":
        """Inverse of `to_json`."""
        return cls(data["context_length"], data.get("vocab"))


def trim_padding(ids: torch.Tensor, pad_id: int, multiple: int = 8) -> torch.Tensor:
    """``ids [N, L]`` without the trailing columns that are padding in every row, rounded up to a
    multiple of ``multiple`` columns (steady shapes for kernels and compilers) and at most ``L``.

    Web captions are short (CC3M's average about 10 words) against a 77-token context, so a causal
    text tower or caption decoder then costs a fraction of the full context. Done on the host,
    where the ids are made, so the train step never waits on the device for a length.
    """
    used = (ids != pad_id).any(0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    return ids[:, : min(ids.shape[1], -(-length // multiple) * multiple)]


def corpus_vocab(captions: Iterable[str], cache: Path | None = None) -> list[int]:
    """BPE ids used by ``captions`` (the compact vocabulary), cached as JSON when ``cache`` is given."""
    if cache is not None and cache.exists():
        return json.loads(cache.read_text())
    bpe = SimpleTokenizer()
    ids = sorted({i for c in captions for i in bpe.encode(c)})
    if cache is not None:
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(ids))
        tmp.replace(cache)
    return ids
