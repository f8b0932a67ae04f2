"""Packing of state structures into one (batch, n) matrix and back."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_deq.solvers.packing import Packer


def _structure(shapes, container, seed=0):
    gen = np.random.default_rng(seed)
    tensors = [tf.constant(gen.standard_normal(s)) for s in shapes]
    if container == "single":
        return tensors[0]
    if container == "dict":
        return {f"k{i}": t for i, t in enumerate(tensors)}
    return {"list": list, "tuple": tuple}[container](tensors)


def _numpy_flat(structure):
    return np.concatenate(
        [np.reshape(t.numpy(), (t.shape[0], -1)) for t in tf.nest.flatten(structure)], axis=1
    )


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 4),
    sample_shapes=st.lists(
        st.lists(st.integers(1, 3), min_size=0, max_size=3), min_size=1, max_size=3
    ),
    container=st.sampled_from(["single", "list", "tuple", "dict"]),
)
def test_pack_unpack_roundtrip(batch, sample_shapes, container):
    if container == "single":
        sample_shapes = sample_shapes[:1]
    shapes = [[batch] + s for s in sample_shapes]
    structure = _structure(shapes, container)
    packer = Packer(structure)
    packed = packer.pack(structure)
    n = sum(int(np.prod(s)) for s in sample_shapes)
    assert packed.shape == (batch, n)
    # Row-major per tensor, tensors in tf.nest order: the same as numpy's layout.
    np.testing.assert_array_equal(packed.numpy(), _numpy_flat(structure))
    unpacked = packer.unpack(packed)
    tf.nest.assert_same_structure(unpacked, structure)
    for a, b in zip(tf.nest.flatten(unpacked), tf.nest.flatten(structure), strict=True):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_matrix_state_is_passed_through():
    z = tf.constant(np.arange(6.0).reshape(2, 3))
    packer = Packer(z)
    assert packer.pack(z) is z
    assert packer.unpack(z) is z


def test_flat_fn_applies_map_on_structure():
    structure = [tf.ones([2, 2, 2]), tf.ones([2, 3])]
    packer = Packer(structure)

    def f(s):
        a, b = s
        return [2.0 * a, b + tf.reduce_sum(a, axis=[1, 2])[:, None]]

    out = packer.flat_fn(f)(packer.pack(structure))
    np.testing.assert_array_equal(out.numpy(), [[2.0] * 4 + [5.0] * 3] * 2)


def test_empty_structure_refused():
    with pytest.raises(ValueError, match="at least one tensor"):
        Packer([])


def test_dtype_is_first_tensor():
    assert Packer([tf.zeros([1, 2], tf.float64), tf.zeros([1, 2])]).dtype == tf.float64


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_precision_packs_in_float32_and_unpacks_back(dtype):
    state = [tf.constant([[1.5, -2.0]], dtype), tf.constant([[[0.25]]], dtype)]
    packer = Packer(state)
    packed = packer.pack(state)
    assert packed.dtype == tf.float32
    out = packer.unpack(packed + 1e-3)
    assert [t.dtype for t in out] == [dtype, dtype]
    np.testing.assert_allclose(tf.cast(out[0], tf.float32).numpy(), [[1.5, -2.0]], atol=1e-2)


def test_dynamic_shapes_in_graph():
    @tf.function(
        input_signature=[
            (tf.TensorSpec([None, None, 2], tf.float32), tf.TensorSpec([None, 3], tf.float32))
        ]
    )
    def roundtrip(s):
        packer = Packer(s)
        packed = packer.pack(s)
        return packed, packer.unpack(packed)

    s = (tf.reshape(tf.range(2 * 4 * 2, dtype=tf.float32), [2, 4, 2]), tf.ones([2, 3]))
    packed, back = roundtrip(s)
    assert packed.shape == (2, 11)
    np.testing.assert_array_equal(packed.numpy()[:, :8], s[0].numpy().reshape(2, 8))
    assert isinstance(back, tuple)
    np.testing.assert_array_equal(back[0].numpy(), s[0].numpy())
    np.testing.assert_array_equal(back[1].numpy(), s[1].numpy())
