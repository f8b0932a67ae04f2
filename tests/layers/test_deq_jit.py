"""`DEQ(jit_compile=...)`: the solves compiled apart by XLA inside a TensorFlow graph."""

import keras
import numpy as np
import pytest

import keras_deq
from keras_deq.backend import tensorflow as tf_backend

pytestmark = pytest.mark.tensorflow_only(
    "solves are compiled apart only inside TensorFlow graphs (JAX compiles the whole step)"
)

import tensorflow as tf  # noqa: E402


def _data(n=32, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype("float32"), rng.integers(0, 3, size=(n,))


def _model(jit_compile, backward="implicit", cell=None, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(8),
            keras_deq.DEQ(
                cell or keras_deq.DenseCell(8),
                solver="anderson",
                max_iter=20,
                tol=1e-5,
                backward=backward,
                jit_compile=jit_compile,
                name="deq",
            ),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        keras.optimizers.SGD(0.1),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _count_xla_calls(monkeypatch):
    calls = []
    original = tf_backend.xla_call

    def counting(fn, *args):
        # Anderson's small systems and mixing are compiled apart whatever `jit_compile` says.
        if getattr(fn, "__name__", "") != "_solve_and_mix":
            calls.append(fn)
        return original(fn, *args)

    monkeypatch.setattr(tf_backend, "xla_call", counting)
    return calls


@pytest.mark.parametrize("backward", ["implicit", "phantom", "one_step"])
def test_compiled_solves_train_like_uncompiled(backward, monkeypatch):
    x, y = _data()
    weights = {}
    for jit in (False, "auto"):
        calls = _count_xla_calls(monkeypatch)
        model = _model(jit, backward)
        logs = model.fit(x, y, batch_size=16, epochs=2, verbose=0).history
        weights[jit] = [w.numpy() for w in model.trainable_weights]
        # Forward solve (and the adjoint of the implicit mode) compiled apart, or nothing.
        expected = {"implicit": 2, "phantom": 1, "one_step": 1}[backward]
        assert len(calls) == (expected if jit == "auto" else 0)
        weights[jit, "steps"] = logs["deq_fwd_steps"]
    assert weights[False, "steps"] == weights["auto", "steps"]
    for plain, compiled in zip(weights[False], weights["auto"], strict=True):
        np.testing.assert_allclose(compiled, plain, rtol=1e-4, atol=1e-5)


def test_unrolled_forward_is_not_compiled_apart(monkeypatch):
    calls = _count_xla_calls(monkeypatch)
    x, y = _data()
    model = _model("auto", "unrolled")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert calls == []  # the gradient goes through the forward loop


def test_eager_calls_and_whole_model_xla_are_not_compiled_apart(monkeypatch):
    calls = _count_xla_calls(monkeypatch)
    x, y = _data()
    model = _model("auto")
    model(x)  # eager
    assert calls == []
    model.compile(
        keras.optimizers.SGD(0.1),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert calls == []  # already inside XLA


class NumpyTanhCell(keras.layers.Layer):
    """A cell with an op XLA cannot compile (`tf.numpy_function`)."""

    def build(self, z_shape, x_shape=None):
        self.kernel = self.add_weight(shape=(z_shape[-1], z_shape[-1]), initializer="zeros")

    def call(self, z, x):
        h = tf.numpy_function(np.tanh, [x], tf.float32, stateful=False)
        h = tf.ensure_shape(h, x.shape)
        return h + 0.1 * tf.tanh(tf.matmul(z, self.kernel))


def test_auto_leaves_cells_that_do_not_support_xla_alone():
    x = _data()[0]
    cell = NumpyTanhCell()
    cell.supports_jit = False
    model = _model("auto", backward="one_step", cell=cell)
    out = model.predict(x, verbose=0)
    assert np.all(np.isfinite(out))

    model = _model(True, backward="one_step", cell=NumpyTanhCell())
    with pytest.raises(Exception, match="(?i)xla|compil|numpy|PyFunc"):
        model.predict(x, verbose=0)


class ConvCell(keras.layers.Layer):
    """z <- tanh(conv3x3(z) + x)."""

    def build(self, z_shape, x_shape):
        self.conv = keras.layers.Conv2D(z_shape[-1], 3, padding="same")
        self.conv.build(z_shape)

    def call(self, z, x):
        return tf.tanh(self.conv(z) + x)

    def compute_output_shape(self, z_shape, x_shape):
        return z_shape


def _conv_model(jit_compile, solver="anderson"):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            keras.layers.Conv2D(4, 3, padding="same"),
            keras_deq.DEQ(
                ConvCell(),
                solver=solver,
                max_iter=30,
                backward_solver="anderson",
                jit_compile=jit_compile,
                name="deq",
            ),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


@pytest.mark.parametrize("solver", ["anderson", "fixed_point"])
def test_auto_compiles_a_conv_cells_heavy_forward_solve_only_on_cpu(solver, monkeypatch):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 6, 6, 1)).astype("float32"), rng.integers(0, 3, size=(16,))
    weights, steps = {}, {}
    for jit in (False, "auto", True):
        calls = _count_xla_calls(monkeypatch)
        model = _conv_model(jit, solver)
        logs = model.fit(x, y, batch_size=8, epochs=2, verbose=0).history
        weights[jit] = [w.numpy() for w in model.trainable_weights]
        steps[jit] = logs["deq_fwd_steps"]
        if jit is True or (jit == "auto" and tf_backend.has_accelerator()):
            expected = 2  # the forward and the adjoint solve compiled whole
        elif jit == "auto":
            # On CPU, XLA's convolutions are slower than TensorFlow's own (its transposed
            # ones, in the adjoint, much slower); Anderson's bookkeeping is faster
            # compiled, a fixed-point step's is not.
            expected = 1 if solver == "anderson" else 0
        else:
            expected = 0
        assert len(calls) == expected
    for jit in ("auto", True):
        np.testing.assert_allclose(steps[jit], steps[False], atol=0.51)
        for plain, compiled in zip(weights[False], weights[jit], strict=True):
            np.testing.assert_allclose(compiled, plain, rtol=1e-4, atol=1e-5)


def test_jit_compile_is_checked_and_saved():
    with pytest.raises(ValueError, match="`jit_compile` must be 'auto', True or False"):
        keras_deq.DEQ(keras_deq.DenseCell(4), jit_compile="yes")
    layer = keras_deq.DEQ(keras_deq.DenseCell(4), jit_compile=False)
    assert layer.get_config()["jit_compile"] is False
    assert keras_deq.DEQ.from_config(layer.get_config()).jit_compile is False
