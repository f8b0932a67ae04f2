"""PyTorch-specific wiring (`torch.autograd`), used through `keras_deq.backend`.

Keras' torch backend runs eagerly: loops are Python loops over torch ops, values can
be read at any time, and gradients follow the data (`torch.autograd`), so a custom
gradient may close over the cell's weights.
"""

import torch

from keras_deq.backend import nests


def vjp(fn, *primals):
    """`(fn(*primals), vjp_fn)` for nests of tensors; `vjp_fn` may be called many times
    (an adjoint solve) and is differentiable where gradients are being recorded (the
    Jacobian penalty's second-order gradient).

    A primal that is already part of a recorded computation (it requires a gradient)
    is used as is, so that the products stay connected to it; others are detached
    copies that require a gradient.
    """
    import keras  # noqa: PLC0415

    flat = [keras.tree.flatten(p) for p in primals]
    flat = [[_differentiable(t) for t in tensors] for tensors in flat]
    packed = [keras.tree.pack_sequence_as(p, t) for p, t in zip(primals, flat, strict=True)]
    with torch.enable_grad():
        out = fn(*packed)
    out_flat = keras.tree.flatten(out)
    sources = [t for tensors in flat for t in tensors]

    def pullback(cotangent):
        cotangents = keras.tree.flatten(cotangent)
        pairs = [(o, c) for o, c in zip(out_flat, cotangents, strict=True) if o.requires_grad]
        wanted = [i for i, t in enumerate(sources) if t.requires_grad]
        grads = [None] * len(sources)
        if pairs and wanted:
            found = torch.autograd.grad(
                [o for o, _ in pairs],
                [sources[i] for i in wanted],
                grad_outputs=[c for _, c in pairs],
                retain_graph=True,
                create_graph=torch.is_grad_enabled(),
                allow_unused=True,
            )
            for i, g in zip(wanted, found, strict=True):
                grads[i] = g
        grads = [
            torch.zeros_like(t) if g is None else g for g, t in zip(grads, sources, strict=True)
        ]
        return nests.split_like(primals, flat, grads)

    return out, pullback


def _differentiable(t):
    if not torch.is_floating_point(t):
        return t
    if t.requires_grad and torch.is_grad_enabled():
        return t
    return t.detach().requires_grad_(True)


class _CustomGradient(torch.autograd.Function):
    """Many tensors in, a list of tensors out, with a backward function of the outputs'
    upstream gradients that returns one gradient (or None) per input."""

    @staticmethod
    def forward(ctx, fn, *inputs):
        outputs, ctx.grad_fn = fn(*inputs)
        ctx.num_inputs = len(inputs)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *upstream):
        grads = tuple(ctx.grad_fn(*upstream))
        if len(grads) != ctx.num_inputs:
            raise ValueError(
                f"A custom gradient returned {len(grads)} gradients for {ctx.num_inputs} inputs."
            )
        return (None, *grads)


def custom_gradient(fn):
    """`fn(*tensors) -> (list of outputs, grad)` with `grad(*upstream)` as its gradient.

    Keras' torch `custom_gradient` allows one output and turns an exception raised in
    the forward function into NaN gradients; this one takes many outputs and lets
    exceptions through.
    """

    def wrapped(*inputs):
        return list(_CustomGradient.apply(fn, *inputs))

    return wrapped


def eigvalsh(real, imag=None):
    """Eigenvalues of the Hermitian `real + i imag`, in `real`'s dtype."""
    if imag is None:
        return torch.linalg.eigvalsh(real)
    return torch.linalg.eigvalsh(torch.complex(real, imag)).to(real.dtype)


def eigenvalue_moduli(matrices):
    """`|eigenvalues|` of real square matrices, in their dtype."""
    return torch.abs(torch.linalg.eigvals(matrices)).to(matrices.dtype)


def to_numpy(t):
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t


def stateless_uniform(shape, seed, dtype):
    """Uniform `[0, 1)` values, a pure function of the int `(2,)` tensor `seed`."""
    generator = torch.Generator(device="cpu")
    a, b = (int(v) for v in seed.detach().cpu().tolist())
    generator.manual_seed((a & 0xFFFFFFFF) << 32 | (b & 0xFFFFFFFF))
    values = torch.rand(tuple(int(s) for s in shape), generator=generator, dtype=torch.float32)
    from keras.src.backend.torch.core import get_device  # noqa: PLC0415

    return values.to(device=get_device(), dtype=getattr(torch, dtype))


def cond(pred, true_fn, false_fn):
    """What Keras' torch `cond` runs: a Python `if`, and `true_fn` on the meta device
    (where Keras infers shapes, `compute_output_spec`)."""
    if isinstance(pred, torch.Tensor) and pred.device.type == "meta":
        return true_fn()
    return true_fn() if pred else false_fn()


def runs_op_by_op():
    """True unless `torch.compile` is tracing (where ops may be fused)."""
    return not torch.compiler.is_compiling()


def twice_differentiable():
    """Attention by the plain math kernel (the fused CPU kernels of
    `scaled_dot_product_attention` have no double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    return sdpa_kernel([SDPBackend.MATH])
