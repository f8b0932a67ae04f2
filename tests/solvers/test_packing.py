"""Packing of state structures into one (batch, n) matrix and back."""

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import ops

from keras_deq.solvers.packing import Packer

from .helpers import dtype_of


def _structure(shapes, container, seed=0):
    # Packing only moves values: float32 (every backend) tests the layout exactly.
    gen = np.random.default_rng(seed)
    tensors = [ops.convert_to_tensor(gen.standard_normal(s), "float32") for s in shapes]
    if container == "single":
        return tensors[0]
    if container == "dict":
        return {f"k{i}": t for i, t in enumerate(tensors)}
    return {"list": list, "tuple": tuple}[container](tensors)


def _numpy_flat(structure):
    return np.concatenate(
        [np.reshape(np.asarray(t), (t.shape[0], -1)) for t in keras.tree.flatten(structure)], axis=1
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
    assert tuple(packed.shape) == (batch, n)
    # Row-major per tensor, tensors in keras.tree order: the same as numpy's layout.
    np.testing.assert_array_equal(np.asarray(packed), _numpy_flat(structure))
    unpacked = packer.unpack(packed)
    keras.tree.assert_same_structure(unpacked, structure)
    assert type(unpacked) is type(structure)
    for a, b in zip(keras.tree.flatten(unpacked), keras.tree.flatten(structure), strict=True):
        assert tuple(a.shape) == tuple(b.shape)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_matrix_state_is_passed_through():
    z = ops.convert_to_tensor(np.arange(6.0).reshape(2, 3), "float32")
    packer = Packer(z)
    assert packer.pack(z) is z
    assert packer.unpack(z) is z


def test_flat_fn_applies_map_on_structure():
    structure = [ops.ones((2, 2, 2)), ops.ones((2, 3))]
    packer = Packer(structure)

    def f(s):
        a, b = s
        return [2.0 * a, b + ops.sum(a, axis=(1, 2))[:, None]]

    out = packer.flat_fn(f)(packer.pack(structure))
    np.testing.assert_array_equal(np.asarray(out), [[2.0] * 4 + [5.0] * 3] * 2)


def test_empty_structure_refused():
    with pytest.raises(ValueError, match="at least one tensor"):
        Packer([])


@pytest.mark.float64
def test_dtype_is_first_tensor():
    assert Packer([ops.zeros((1, 2), "float64"), ops.zeros((1, 2))]).dtype == "float64"
    assert Packer([ops.zeros((1, 2)), ops.zeros((1, 2), "float64")]).dtype == "float32"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_packs_in_float32_and_unpacks_back(dtype):
    state = [ops.convert_to_tensor([[1.5, -2.0]], dtype), ops.convert_to_tensor([[[0.25]]], dtype)]
    packer = Packer(state)
    packed = packer.pack(state)
    assert dtype_of(packed) == "float32"
    out = packer.unpack(packed + 1e-3)
    assert [dtype_of(t) for t in out] == [dtype, dtype]
    out0 = np.asarray(ops.convert_to_numpy(out[0]), np.float32)
    np.testing.assert_allclose(out0, [[1.5, -2.0]], atol=1e-2)


@pytest.mark.tensorflow_only("unknown static dimensions exist only in TensorFlow graphs")
def test_dynamic_shapes_in_graph():
    import tensorflow as tf

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
    np.testing.assert_array_equal(np.asarray(packed)[:, :8], np.asarray(s[0]).reshape(2, 8))
    assert isinstance(back, tuple)
    np.testing.assert_array_equal(np.asarray(back[0]), np.asarray(s[0]))
    np.testing.assert_array_equal(np.asarray(back[1]), np.asarray(s[1]))
