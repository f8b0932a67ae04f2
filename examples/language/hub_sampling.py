"""Text generation with keras-hub's samplers (greedy, random, top-k, top-p).

keras-hub is optional here: the example's default, `DEQTransformerLM.generate`
(temperature sampling or greedy, from keras_deq), needs nothing else. These samplers
are keras-hub's own (`keras_hub.samplers`), driven through their `next` function
interface; they need keras-hub but not tensorflow-text, which only keras-hub's
tokenizers use.

`generate(model, prompt, length, sampler)` appends `length` tokens to the prompt. The
sampler fills a fixed-length token buffer one position at a time inside one
`ops.while_loop`; `next` solves the model on the `max_context` tokens that end at the
position, a window of fixed size (a dynamic slice), and returns the logits of its last
filled position. Before the buffer holds `max_context` tokens, the window also covers
unfilled positions after it; the model is exactly causal (it solves each position as
its own sample), so they do not change the logits read.
"""

import numpy as np

SAMPLERS = ("greedy", "random", "top_k", "top_p")


def import_keras_hub():
    """`keras_hub`, or an ImportError that says how to install it."""
    try:
        import keras_hub  # noqa: PLC0415
    except ImportError as error:
        raise ImportError(
            "keras-hub's samplers need keras-hub, an optional dependency of this example: "
            'see docs/tutorials/language.md (`pip install ".[hub]"`; with tensorflow-cpu, '
            "`pip install --no-deps keras-hub` and `pip install regex tokenizers`). The "
            "default sampler, "
            "`DEQTransformerLM.generate` (`--sampler model`), needs nothing else."
        ) from error
    return keras_hub


def make_sampler(name, temperature=1.0, seed=None, k=5, p=0.9):
    """A keras-hub sampler by name (`SAMPLERS`).

    Args:
        name: `"greedy"`, `"random"`, `"top_k"` (the `k` most probable tokens) or
            `"top_p"` (the most probable tokens whose probabilities sum to `p`).
        temperature: Softmax temperature.
        seed: Seed of the random samplers.
        k: Tokens kept by `"top_k"`.
        p: Probability mass kept by `"top_p"`.
    """
    samplers = import_keras_hub().samplers
    if name == "greedy":
        return samplers.GreedySampler(temperature=temperature)
    if name == "random":
        return samplers.RandomSampler(temperature=temperature, seed=seed)
    if name == "top_k":
        return samplers.TopKSampler(k=k, temperature=temperature, seed=seed)
    if name == "top_p":
        return samplers.TopPSampler(p=p, temperature=temperature, seed=seed)
    raise ValueError(f"Unknown sampler. Expected one of {SAMPLERS}. Received: {name!r}")


def generate(model, prompt, length, sampler, max_context=None):
    """Continues token sequences with a keras-hub sampler.

    Args:
        model: A causal language model (`keras_deq.models.DEQTransformerLM`): int
            tokens `(batch, T)` to logits `(batch, T, vocab)`.
        prompt: Token ids, `(T,)` or `(batch, T)`.
        length: Number of tokens to append.
        sampler: A `keras_hub.samplers.Sampler` (see `make_sampler`).
        max_context: Tokens the model sees for each new one (all by default).

    Returns:
        An int32 array with the prompt and the `length` new tokens, shaped like the prompt.
    """
    from keras import ops  # noqa: PLC0415

    tokens = np.asarray(prompt, dtype="int32")
    single = tokens.ndim == 1
    tokens = np.atleast_2d(tokens)
    batch, start = tokens.shape
    if start == 0:
        raise ValueError("`prompt` must hold at least one token.")
    total = start + int(length)
    window = total if max_context is None else min(int(max_context), total)
    buffer = np.zeros((batch, total), "int32")
    buffer[:, :start] = tokens

    def next_logits(prompt, cache, index):
        # The window of `window` tokens that ends at `index` (or the first `window`).
        begin = ops.maximum(index - window, 0)
        context = ops.slice(prompt, (0, begin), (batch, window))
        logits = model(context, training=False)
        return ops.take(logits, index - 1 - begin, axis=1), None, cache

    out = sampler(next_logits, ops.convert_to_tensor(buffer), index=start, model=model)
    out = ops.convert_to_numpy(out).astype("int32")
    return out[0] if single else out
