"""Debian's fortunes as a character-level language-modelling corpus, held in memory as int64 tensors.

The ``fortunes`` package (``apt-get install -y fortunes``) installs plain-text files into
/usr/share/games/fortunes/: quotes separated by lines holding only ``%``. Beside each file lie a
``.dat`` index (for the ``fortune`` program) and a ``.u8`` symlink to the same file; both are skipped.
The corpus is about 15k fortunes and 2.5M characters.

Cleaning. Some fortunes underline or accent words by overstriking: ``_\\bI``, ``____\\b\\b\\b\\bLAST``,
``Ren'\\be``. A terminal shows the character written last at each place, so each backspace erases the
character before it (``LAST``, ``Rene``): the text a reader sees, without the underline or the
accent. Other control characters (a few BELs) are dropped. Tabs and newlines are kept.

Splits are made by fortune, not by character, so that no quote is split between training and
evaluation. A fixed seeded permutation of all fortunes gives validation, test and training
(5/5/90 % by default). The vocabulary is the set of characters of the training text actually used
(after ``train_chars``). Characters of the validation and test text outside it map to ``<unk>``. Each
fortune is followed by ``<eof>``, so the model also learns where a quote ends (like the ``<eos>`` of
PyTorch's word_language_model example).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch

FORTUNES_DIR = "/usr/share/games/fortunes"
SETUP_HINT = "install it with: apt-get update && apt-get install -y fortunes"
UNK, EOF = "<unk>", "<eof>"
UNK_ID, EOF_ID = 0, 1

_ERASED = re.compile(r"[^\n\x08]\x08")  # a character and the backspace that erases it
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # control characters but tab and newline


def clean(text: str) -> str:
    """Resolve overstriking (a backspace erases the character before it) and drop control characters
    other than tab and newline."""
    while "\b" in text:
        erased = _ERASED.sub("", text)
        if erased == text:  # backspaces at the start of a line erase nothing
            break
        text = erased
    return _CONTROL.sub("", text)


def parse_fortunes(text: str) -> List[str]:
    """The fortunes of one file: the text between lines holding only ``%``, cleaned; blank ones dropped."""
    out, lines = [], []
    for line in text.split("\n"):
        if line == "%":
            out.append("\n".join(lines))
            lines = []
        else:
            lines.append(line)
    out.append("\n".join(lines))
    out = [clean(f).strip("\n") for f in out]
    return [f + "\n" for f in out if f.strip()]


def fortune_files(root: str) -> List[str]:
    """The corpus files of a fortunes folder: plain files, not the .dat indexes or the .u8 symlinks."""
    if not os.path.isdir(root):
        return []
    names = sorted(os.listdir(root))
    return [os.path.join(root, n) for n in names
            if not n.endswith(".dat") and not os.path.islink(os.path.join(root, n))
            and os.path.isfile(os.path.join(root, n))]


@dataclass
class TextSplit:
    ids: torch.Tensor     # int64 [N]: character ids, each fortune followed by <eof>
    starts: torch.Tensor  # int64 [F + 1]: where each fortune begins in ids, then N

    def __len__(self) -> int:
        return self.ids.numel()

    def to(self, device) -> "TextSplit":
        return TextSplit(self.ids.to(device), self.starts)

    def shuffled(self, generator: torch.Generator) -> torch.Tensor:
        """The ids with the fortunes in a random order (each fortune kept whole)."""
        bounds = self.starts.tolist()
        order = torch.randperm(len(bounds) - 1, generator=generator).tolist()
        return torch.cat([self.ids[bounds[i] : bounds[i + 1]] for i in order])


@dataclass
class TextData:
    train: TextSplit
    val: TextSplit
    test: TextSplit
    vocab: List[str]  # id -> character; 0 and 1 are <unk> and <eof>
    info: dict


def encode(fortunes: List[str], stoi: dict) -> TextSplit:
    ids, starts = [], []
    for f in fortunes:
        starts.append(len(ids))
        ids.extend(stoi.get(c, UNK_ID) for c in f)
        ids.append(EOF_ID)
    starts.append(len(ids))
    return TextSplit(torch.tensor(ids, dtype=torch.int64), torch.tensor(starts, dtype=torch.int64))


def load_fortunes(root: Optional[str] = None, train_chars: int = 0, val_frac: float = 0.05,
                  test_frac: float = 0.05, split_seed: int = 0) -> TextData:
    """Train / validation / test splits of the fortunes corpus as character ids.

    ``train_chars`` > 0 trains on the first training fortunes (in the permuted order) until they hold
    at least that many characters; validation and test always keep their full fraction."""
    root = root or FORTUNES_DIR
    files = fortune_files(root)
    if not files:
        raise FileNotFoundError(f"Debian fortunes not found (no fortune files in {root}); {SETUP_HINT}")
    fortunes = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            fortunes += parse_fortunes(f.read())
    n = len(fortunes)
    n_val, n_test = round(val_frac * n), round(test_frac * n)
    if n - n_val - n_test < 1:
        raise ValueError(f"{root}: {n} fortunes are too few to split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed)).tolist()
    val = [fortunes[i] for i in perm[:n_val]]
    test = [fortunes[i] for i in perm[n_val : n_val + n_test]]
    train_all = [fortunes[i] for i in perm[n_val + n_test :]]
    train, size = [], 0
    for f in train_all:
        if train_chars and size >= train_chars:
            break
        train.append(f)
        size += len(f)
    vocab = [UNK, EOF] + sorted(set("".join(train)))
    stoi = {c: i for i, c in enumerate(vocab) if i >= 2}
    splits = [encode(s, stoi) for s in (train, val, test)]
    info = dict(dataset="fortunes", root=root, files=len(files), fortunes=n,
                train_fortunes=len(train), val_fortunes=len(val), test_fortunes=len(test),
                train_fortunes_available=len(train_all),
                n_train=len(splits[0]), n_val=len(splits[1]), n_test=len(splits[2]),
                vocab_size=len(vocab), split_seed=split_seed,
                unk_val=int((splits[1].ids == UNK_ID).sum()), unk_test=int((splits[2].ids == UNK_ID).sum()),
                cleaning="overstrike: a backspace erases the character before it; control characters "
                         "other than tab and newline dropped")
    return TextData(*splits, vocab=vocab, info=info)


def batchify(ids: torch.Tensor, streams: int) -> torch.Tensor:
    """[L, streams]: the ids cut into ``streams`` contiguous parallel streams (the last
    ``len(ids) % streams`` ids are dropped), as in PyTorch's word_language_model example."""
    length = ids.numel() // streams
    if length < 2:
        raise ValueError(f"{ids.numel()} characters are too few for {streams} streams")
    return ids[: length * streams].view(streams, length).t().contiguous()


def bptt_windows(data: torch.Tensor, bptt: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Windows of ``data`` [L, B] along time: inputs [T, B] and next-character targets [T, B], T <= bptt.
    Every position but each stream's first is a target exactly once."""
    for i in range(0, data.shape[0] - 1, bptt):
        n = min(bptt, data.shape[0] - 1 - i)
        yield data[i : i + n], data[i + 1 : i + 1 + n]
