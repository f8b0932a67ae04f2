"""Look-up of solvers by name and checking of solver options."""

import pytest

from keras_deq import solvers
from keras_deq.solvers import registry

from .helpers import AFFINE_SOLVER_NAMES, SOLVER_NAMES

ALL_NAMES = SOLVER_NAMES + AFFINE_SOLVER_NAMES


def test_names():
    assert solvers.names() == ALL_NAMES
    assert registry.names() == ALL_NAMES


@pytest.mark.parametrize("name", ALL_NAMES)
def test_get_by_name(name):
    # registry.get gives the function form; solvers.get an object of the solver's class.
    fn = registry.get(name)
    assert fn is getattr(solvers, name)
    assert fn.__name__ == name
    solver = solvers.get(name)
    assert isinstance(solver, solvers.Solver)
    assert type(solver).name == name


def test_get_returns_callables_as_is():
    def custom(f, z0, max_iter=5, tol=1e-3, stop_mode="rel"):
        return None

    assert registry.get(custom) is custom
    assert registry.get(solvers.anderson) is solvers.anderson
    # solvers.get returns Solver objects only.
    with pytest.raises(ValueError, match="Unknown solver"):
        solvers.get(custom)


@pytest.mark.parametrize("identifier", ["newton", "Anderson", "fixed-point", ""])
def test_get_unknown_name_mentions_it(identifier):
    with pytest.raises(ValueError, match=f"solver={identifier!r}"):
        solvers.get(identifier)


@pytest.mark.parametrize("identifier", [None, 3, ["anderson"]])
def test_get_non_string(identifier):
    with pytest.raises(ValueError, match="Unknown solver"):
        solvers.get(identifier)


def test_unknown_name_message_lists_valid_names():
    with pytest.raises(ValueError) as info:
        solvers.get("newton")
    for name in ALL_NAMES:
        assert name in str(info.value)


def test_options_of():
    assert registry.options_of("fixed_point") == {"damping": 1.0, "fixed_steps": False}
    assert registry.options_of("anderson") == {"window": 5, "beta": 1.0, "ridge": 1e-4}
    assert registry.options_of("broyden") == {"memory": 20}
    assert registry.options_of("gmres") == {"restart": 20}


def test_options_of_matches_signatures():
    # Every option the registry reports is a keyword the solver accepts with a default,
    # and the common arguments are excluded.
    import inspect

    for name in ALL_NAMES:
        params = inspect.signature(registry.get(name)).parameters
        assert list(params)[:5] == list(registry.COMMON_ARGS)
        for key, default in registry.options_of(name).items():
            assert params[key].default == default


@pytest.mark.parametrize(
    "name, options",
    [
        ("fixed_point", {"damping": 0.5}),
        ("anderson", {"window": 3, "beta": 0.9}),
        ("anderson", {"ridge": 0.0}),
        ("broyden", {"memory": 4}),
        ("broyden", {}),
        ("broyden", None),
        ("gmres", {"restart": 5}),
    ],
)
def test_check_options_accepts_known(name, options):
    checked = registry.check_options(name, options)
    assert checked == dict(options or {})
    assert type(checked) is dict


@pytest.mark.parametrize(
    "name, options, bad",
    [
        ("fixed_point", {"window": 3}, "window"),
        ("anderson", {"memory": 3}, "memory"),
        ("anderson", {"window": 3, "momentum": 0.1}, "momentum"),
        ("broyden", {"damping": 0.5}, "damping"),
        ("broyden", {"tol": 1e-3}, "tol"),  # common arguments are not options
        ("gmres", {"window": 3}, "window"),
    ],
)
def test_check_options_refuses_unknown(name, options, bad):
    with pytest.raises(ValueError, match=bad) as info:
        registry.check_options(name, options)
    message = str(info.value)
    assert name in message
    assert "solver_options" in message


def test_check_options_names_the_argument():
    with pytest.raises(ValueError, match="my_options"):
        registry.check_options("anderson", {"nope": 1}, argument="my_options")


def test_check_options_does_not_mutate():
    options = {"window": 3}
    checked = registry.check_options("anderson", options)
    checked["beta"] = 0.5
    assert options == {"window": 3}


def test_check_options_for_custom_solver():
    def custom(f, z0, max_iter=5, tol=1e-3, stop_mode="rel", alpha=0.1):
        return None

    assert registry.check_options(custom, {"alpha": 0.3}) == {"alpha": 0.3}
    with pytest.raises(ValueError, match="beta"):
        registry.check_options(custom, {"beta": 0.3})


def test_check_options_unknown_solver_name():
    with pytest.raises(ValueError, match="newton"):
        registry.check_options("newton", {})
