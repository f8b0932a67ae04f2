"""`Configurable`: the base of keras_deq's settings objects (backward modes, penalties).

Such an object's settings are its constructor arguments, checked once there and
stored under attributes of the same names; `get_config` reads them back. A family
(e.g. `Backward`) is a direct subclass that owns a name registry: its subclasses
that set the class attribute `name` are reachable by that name through `get`.
"""

import inspect
from collections.abc import Mapping

import keras

_NAMED_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class Configurable:
    """Settings from the constructor's signature, a config, a repr and a name registry.

    A family base sets `family` (a word for messages, e.g. `"backward mode"`) and
    `_registry = {}`; its subclasses set `name` to be reachable by that name.
    """

    name = None
    """The short name the family's `get` accepts; None: reachable only as an object."""

    family = "object"
    _registry = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is None:
            cls.name = None  # a subclass does not take its parent's name
            return
        if not isinstance(name, str) or not name:
            raise ValueError(
                "`name` must be a non-empty string or None. "
                f"Received: {cls.__qualname__}.name={name!r}"
            )
        previous = cls._registry.get(name)
        where = (cls.__module__, cls.__qualname__)
        if previous is not None and (previous.__module__, previous.__qualname__) != where:
            raise ValueError(
                f"A {cls.family} named {name!r} is already registered "
                f"({previous.__module__}.{previous.__qualname__}). "
                f"Received: {cls.__module__}.{cls.__qualname__}.name={name!r}"
            )
        cls._registry[name] = cls  # a re-definition (same module and name) replaces it

    @classmethod
    def settings(cls):
        """The constructor arguments, `{name: default}`, over the class hierarchy."""
        out = {}
        for klass in reversed(cls.__mro__):
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            for key, param in inspect.signature(init).parameters.items():
                if key != "self" and param.kind in _NAMED_KINDS:
                    out[key] = param.default
        return out

    def get_config(self):
        """Every constructor argument, read from the attribute of the same name."""
        return {key: getattr(self, key) for key in self.settings()}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.settings())
        return f"{type(self).__name__}({args})"


def get(base, identifier, argument, **overrides):
    """An instance of the family `base` from a name, a config dict or an instance.

    Args:
        base: The family's base class (its subclasses register names).
        identifier: A registered name, a config dict as made by `serialize`, or an
            instance (returned as is when there are no `overrides`).
        argument: The argument's name, for error messages.
        **overrides: Settings that replace the object's, checked by its constructor.
    """
    if isinstance(identifier, base):
        if not overrides:
            return identifier
        return type(identifier).from_config({**identifier.get_config(), **overrides})
    if isinstance(identifier, str) and identifier in base._registry:
        return base._registry[identifier](**overrides)
    if isinstance(identifier, Mapping):
        return get(base, deserialize(base, identifier, argument), argument, **overrides)
    raise ValueError(
        f"Unknown {base.family}. Expected one of {tuple(base._registry)}, a config dict or "
        f"a `{base.__name__}` instance. Received: {argument}={identifier!r}"
    )


def serialize(base, obj, argument):
    """The config dict of `obj` (`keras.saving.serialize_keras_object`)."""
    if not isinstance(obj, base):
        raise ValueError(
            f"`{argument}` must be a `{base.__name__}` instance. Received: {argument}={obj!r}"
        )
    return keras.saving.serialize_keras_object(obj)


def deserialize(base, config, argument, custom_objects=None):
    """The instance of the family `base` described by `config`, as made by `serialize`."""
    if not isinstance(config, Mapping) or "class_name" not in config:
        raise ValueError(
            f"`{argument}` must be a dict with 'class_name' and 'config' keys, as made by "
            f"`serialize`. Received: {argument}={config!r}"
        )
    module_objects = {cls.__name__: cls for cls in base._registry.values()}
    try:
        obj = keras.saving.deserialize_keras_object(
            dict(config), module_objects=module_objects, custom_objects=custom_objects
        )
    except TypeError as error:  # unknown constructor arguments
        raise ValueError(f"{error}. Received: {argument}={config!r}") from error
    if not isinstance(obj, base):
        raise ValueError(
            f"`{argument}` must describe a `{base.__name__}`: a built-in class "
            f"({', '.join(sorted(module_objects))}) or one registered with "
            f"`keras.saving.register_keras_serializable`. Received: {argument}={config!r}"
        )
    return obj


def config_value(value):
    """`value` as a layer's config holds it: a `Configurable` (a solver, a backward
    mode, a `Budget`) as its config dict, anything else (a name, a number) as is."""
    if isinstance(value, Configurable):
        return keras.saving.serialize_keras_object(value)
    return value
