"""`KernelReparametrization`: a wrapper that computes the kernels of any layer or cell
from parameters of its own (the base of `WeightNormalization` and
`SpectralReparametrization`)."""

import keras


@keras.saving.register_keras_serializable(package="keras_deq")
class KernelReparametrization(keras.layers.Layer):
    """Calls `layer` with each of its kernels replaced by `effective_kernel(kernel)`.

    The kernels are the wrapped layer's trainable variables of rank 2 or more
    (Dense, Conv, EinsumDense kernels; a cell's own weight matrices), except those
    whose path contains a string of `exclude`. The wrapped layer keeps its
    variables (each kernel is the free parameter the effective kernel is computed
    from); the wrapper adds its own per kernel, made by `build_kernel`. The
    effective kernels are computed at every call and differentiated through
    (a reparametrization, not a projection of the weights after each update), and
    handed to `layer` in a `keras.StatelessScope`: any layer or cell works as is,
    and a `.keras` file holds the wrapper, the layer and both sets of variables.
    State that the wrapped layer updates in its call (a dropout seed) is passed on;
    a cell's `state_shape` and `initial_state` methods too, and the maps a solver asks
    the cell for (`wrapped_method`, e.g. SAM's `prior_gradient`), computed with the
    effective kernels.

    A subclass implements `build_kernel(kernel)` (creates its variables for one
    kernel, returns what `effective_kernel` needs) and
    `effective_kernel(kernel, state, training)`.

    Args:
        layer: The layer or cell to wrap, built or not.
        exclude: Strings; a kernel whose variable path contains one is left as it is.
        **kwargs: Base layer arguments.
    """

    def __init__(self, layer, exclude=(), **kwargs):
        super().__init__(**kwargs)
        if not isinstance(layer, keras.layers.Layer):
            raise ValueError(f"`layer` must be a Keras layer. Received: layer={layer!r}")
        if isinstance(exclude, str) or not all(isinstance(e, str) for e in exclude):
            raise ValueError(f"`exclude` must be a list of strings. Received: exclude={exclude!r}")
        self.layer = layer
        self.exclude = tuple(exclude)
        self._kernels = None
        for method in ("state_shape", "initial_state"):  # a `Cell`'s, read by `DEQ`
            if callable(getattr(layer, method, None)):
                setattr(self, method, getattr(layer, method))
        if layer.built:
            self._build_kernels()

    def _build_kernels(self):
        kernels = [
            v
            for v in self.layer.trainable_variables
            if len(v.shape) >= 2 and not any(e in v.path for e in self.exclude)
        ]
        if not kernels:
            raise ValueError(
                f"{type(self).__name__} found no kernel (trainable variable of rank >= 2) to "
                f"reparametrize in {self.layer.name}. Received: exclude={self.exclude!r}"
            )
        self._kernels = [(v, self.build_kernel(v)) for v in kernels]

    def build_kernel(self, kernel):
        """Creates the wrapper's variables for `kernel`; returns what
        `effective_kernel` needs about them."""
        raise NotImplementedError(f"{type(self).__name__} must implement `build_kernel`.")

    def effective_kernel(self, kernel, state, training):
        """The kernel `layer` computes with, from its free parameter `kernel` (a tensor)."""
        raise NotImplementedError(f"{type(self).__name__} must implement `effective_kernel`.")

    def effective_kernels(self, training=False):
        """The effective kernel of each reparametrized variable, as a list."""
        return [self.effective_kernel(v.value, s, training) for v, s in self._kernels]

    def __call__(self, *args, **kwargs):
        if self._kernels is None:
            # The wrapped layer builds on its first call (with the `KerasTensor`s of
            # a `DEQ`'s build, nothing is computed); then the wrapper's own variables.
            self.layer(*args, **kwargs)
            self._build_kernels()
        return super().__call__(*args, **kwargs)

    def call(self, *args, training=None, **kwargs):
        if training is not None:
            kwargs["training"] = training
        return self._with_effective_kernels(lambda: self.layer(*args, **kwargs), training)

    def _with_effective_kernels(self, fn, training):
        """`fn()` with `layer`'s kernels replaced by their effective values."""
        kernels = zip(self._kernels, self.effective_kernels(training), strict=True)
        replaced = {id(v): k for (v, _), k in kernels}
        # Every variable of `layer` is mapped (an inner scope hides the enclosing one, e.g.
        # JAX's training step): the kernels to their effective values, the rest as they are.
        mapping = [(v, replaced.get(id(v), v.value)) for v in self.layer.variables]
        with keras.StatelessScope(state_mapping=mapping) as scope:
            out = fn()
            state = [(v, scope.get_current_value(v)) for v in self.layer.non_trainable_variables]
        for variable, value in state:  # assigned in the scope: pass the update on
            if value is not scope.state_mapping[id(variable)]:
                variable.assign(value)
        return out

    def wrapped_method(self, name):
        """The wrapped layer's method `name` (through nested wrappers), computed with the
        effective kernels, or None if it has none: the maps a solver asks the cell for
        besides `f` (`Solver.extra_maps`, e.g. SAM's `prior_gradient`)."""
        method = getattr(self.layer, name, None)
        if not callable(method) and isinstance(self.layer, KernelReparametrization):
            method = self.layer.wrapped_method(name)
        if not callable(method):
            return None

        def method_with_effective_kernels(*args, **kwargs):
            return self._with_effective_kernels(lambda: method(*args, **kwargs), None)

        return method_with_effective_kernels

    def compute_output_shape(self, *args, **kwargs):
        return self.layer.compute_output_shape(*args, **kwargs)

    def compute_output_spec(self, *args, **kwargs):
        return self.layer.compute_output_spec(*args, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "layer": keras.saving.serialize_keras_object(self.layer),
                "exclude": list(self.exclude),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["layer"] = keras.saving.deserialize_keras_object(config["layer"])
        return cls(**config)
