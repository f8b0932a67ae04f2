"""Solver objects: `get`, serialization, settings checked once, the shared loop.

The user-defined solver is the worked example of docs/development.md, run from the
page itself and compared with a plain numpy reference.
"""

import json
import pathlib
import re

import keras
import numpy as np
import pytest
from keras import ops

from keras_deq import solvers
from keras_deq.solvers import base, common, registry

from .helpers import (
    AFFINE_SOLVER_NAMES,
    FLOAT_DTYPES,
    SOLVER_NAMES,
    Counter,
    LinearMap,
    Recorder,
    TanhMap,
    compiled,
    const,
    flat,
    residuals_np,
)

CLASSES = {
    "fixed_point": solvers.FixedPoint,
    "anderson": solvers.Anderson,
    "broyden": solvers.Broyden,
}
NON_DEFAULT = {
    "fixed_point": {
        "max_iter": 7,
        "tol": 1e-5,
        "stop_mode": "abs",
        "damping": 0.5,
        "fixed_steps": True,
    },
    "anderson": {
        "max_iter": 9,
        "tol": 1e-6,
        "stop_mode": "abs",
        "window": 3,
        "beta": 0.7,
        "ridge": 0.0,
    },
    "broyden": {"max_iter": 11, "tol": 1e-3, "stop_mode": "rel", "memory": 4},
}
DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "development.md"


# ------------------------------------------------------------------------------- get
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_get_by_name_gives_an_object_with_default_settings(name):
    solver = solvers.get(name)
    assert type(solver) is CLASSES[name] and type(solver).name == name
    assert solver.get_config() == CLASSES[name]().get_config()
    assert solvers.get(name, **NON_DEFAULT[name]).get_config() == NON_DEFAULT[name]


def test_get_instance_and_overrides():
    solver = solvers.Anderson(window=3)
    assert solvers.get(solver) is solver
    other = solvers.get(solver, max_iter=7)
    assert type(other) is solvers.Anderson and other is not solver
    assert (other.max_iter, other.window, solver.max_iter) == (7, 3, 50)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_get_config_dict(name):
    cls_name = CLASSES[name].__name__
    short = {"class_name": cls_name, "config": NON_DEFAULT[name]}
    assert solvers.get(short).get_config() == NON_DEFAULT[name]
    full = solvers.serialize(solvers.get(short))
    assert solvers.get(full).get_config() == NON_DEFAULT[name]
    assert solvers.get(full, max_iter=3).max_iter == 3


@pytest.mark.parametrize(
    "identifier",
    [
        "newton",
        "Anderson",
        "fixed-point",
        "",
        None,
        3,
        ["anderson"],
        solvers.anderson,
        solvers.Anderson,
    ],
    ids=lambda v: getattr(v, "__name__", repr(v)),
)
def test_get_refuses_anything_else(identifier):
    with pytest.raises(ValueError, match="Unknown solver") as info:
        solvers.get(identifier)
    assert f"solver={identifier!r}" in str(info.value)
    for name in SOLVER_NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"config": {}}, "class_name"),
        ({"class_name": "Newton", "config": {}}, "must describe a `Solver`"),
        (keras.optimizers.serialize(keras.optimizers.Adam()), "must describe a `Solver`"),
        ({"class_name": "Anderson", "config": {"window": 0}}, r"Received: window=0"),
        ({"class_name": "Anderson", "config": {"memory": 3}}, "memory"),
    ],
)
def test_get_refuses_bad_config_dicts(config, match):
    with pytest.raises(ValueError, match=match):
        solvers.get(config)


def test_get_with_bad_overrides():
    with pytest.raises(ValueError, match=r"Received: window=0"):
        solvers.get("anderson", window=0)
    with pytest.raises(TypeError, match="memory"):
        solvers.get("anderson", memory=3)


# ---------------------------------------------------------------------- serialization
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_config_round_trips(name):
    solver = CLASSES[name](**NON_DEFAULT[name])
    config = solver.get_config()
    assert config == NON_DEFAULT[name]
    assert CLASSES[name].from_config(config).get_config() == config
    # Through keras.saving and JSON, without custom_objects: the classes are registered.
    text = json.dumps(keras.saving.serialize_keras_object(solver))
    restored = keras.saving.deserialize_keras_object(json.loads(text))
    assert type(restored) is CLASSES[name] and restored.get_config() == config
    assert keras.saving.get_registered_name(CLASSES[name]) == f"keras_deq>{CLASSES[name].__name__}"
    restored = solvers.deserialize(json.loads(json.dumps(solvers.serialize(solver))))
    assert type(restored) is CLASSES[name] and restored.get_config() == config
    assert repr(restored) == repr(solver)


def test_serialize_refuses_non_solvers():
    with pytest.raises(ValueError, match="solver="):
        solvers.serialize(solvers.anderson)


# -------------------------------------------------------------------- settings checks
@pytest.mark.parametrize(
    "name, kwargs, received",
    [
        ("fixed_point", {"damping": 0}, "damping=0"),
        ("fixed_point", {"damping": 1.5}, "damping=1.5"),
        ("anderson", {"window": 0}, "window=0"),
        ("anderson", {"window": 2.5}, "window=2.5"),
        ("anderson", {"beta": 0.0}, "beta=0.0"),
        ("anderson", {"ridge": -1}, "ridge=-1"),
        ("broyden", {"memory": 0}, "memory=0"),
        ("broyden", {"memory": True}, "memory=True"),
    ]
    + [(name, {"max_iter": 0}, "max_iter=0") for name in SOLVER_NAMES]
    + [(name, {"tol": -1e-3}, "tol=-0.001") for name in SOLVER_NAMES]
    + [(name, {"stop_mode": "REL"}, "stop_mode='REL'") for name in SOLVER_NAMES],
)
def test_bad_settings_refused_at_construction(name, kwargs, received):
    with pytest.raises(ValueError, match=re.escape(f"Received: {received}")):
        CLASSES[name](**kwargs)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_settings_are_checked_once(name, monkeypatch):
    solver = CLASSES[name](**NON_DEFAULT[name])

    def refuse(*args, **kwargs):
        raise AssertionError("settings were checked again at call time")

    for check in ("check_positive_int", "check_positive_float", "check_fraction"):
        monkeypatch.setattr(common, check, refuse)
    for check in ("check_nonnegative_float", "check_stop_mode", "check_max_iter"):
        monkeypatch.setattr(common, check, refuse)
    result = solver(lambda z: 0.5 * z + 1.0, np.zeros((2, 3), "float32"))
    assert int(result.steps) >= 1


def test_settings_are_normalized():
    solver = solvers.Anderson(max_iter=np.int64(4), window=np.int32(3), beta=1, ridge=0)
    assert solver.get_config() == {
        "max_iter": 4,
        "tol": 1e-4,
        "stop_mode": "rel",
        "window": 3,
        "beta": 1.0,
        "ridge": 0.0,
    }
    assert type(solver.max_iter) is int and type(solver.window) is int


def test_tensor_max_iter_made_outside_the_compiled_function_it_runs_in():
    solver = solvers.FixedPoint(max_iter=ops.convert_to_tensor(3, "int32"), tol=1e-12)
    run = compiled(lambda z: solver(lambda s: 0.5 * s + 1.0, z))
    assert int(run(ops.zeros((2, 3))).steps) == 3
    zero = ops.convert_to_tensor(0, "int32")
    assert int(solvers.FixedPoint(max_iter=zero)(ops.tanh, ops.ones((2, 3))).steps) == 1
    for bad in (ops.convert_to_tensor(2.0), ops.convert_to_tensor([3, 4], "int32")):
        with pytest.raises(ValueError, match="max_iter"):
            solvers.FixedPoint(max_iter=bad)
    restored = solvers.get(json.loads(json.dumps(solvers.serialize(solver))))
    assert int(restored(lambda s: 0.5 * s + 1.0, ops.zeros((2, 3))).steps) == 3


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_tensor_max_iter_is_a_run_time_budget_when_compiled(name):
    # The budget is an argument of the compiled function: one trace serves every value
    # (values below 1 act as 1). z -> z + 1 has no fixed point, so every solver runs
    # until the budget, evaluating f once per step.
    traces = []
    f = Counter(lambda z: z + 1.0)

    def solve(z0, budget):
        traces.append(1)
        return solvers.get(name, max_iter=budget, tol=1e-6)(f, z0)

    run = compiled(solve)
    z0 = ops.zeros((2, 3))
    steps = []
    for budget in (3, 7, 0, -2):
        f.reset()
        steps.append(int(run(z0, ops.convert_to_tensor(budget, "int32")).steps))
        assert f.count == steps[-1]
    assert steps == [3, 7, 1, 1]
    assert len(traces) == 1


def test_call_overrides_build_a_new_object():
    solver = solvers.Anderson(window=3)
    z0 = np.zeros((2, 5), "float32")
    result = solver(TanhMap(5, 2, norm=0.9), z0, max_iter=2, tol=1e-12)
    assert int(result.steps) == 2 and solver.max_iter == 50
    with pytest.raises(TypeError):
        solver(ops.tanh, z0, memory=3)


# ---------------------------------------------- same results as the function forms
def _nested_map(state):
    z, x = state
    return [ops.tanh(ops.matmul(z, const(0.4 * np.eye(4), z)) + x), x]


def _nan_map(z):
    bad = np.array([[False], [True], [False]])
    return ops.where(ops.logical_and(bad, z[:, :1] > 1.5), const(np.nan, z), 0.5 * z + 1.0)


MAPS = {
    "tanh": (TanhMap(6, 3, norm=0.9, seed=1), lambda: np.zeros((3, 6))),
    "tanh32": (TanhMap(6, 3, norm=0.9, seed=2), lambda: ops.zeros((3, 6), "float32")),
    "nested": (_nested_map, lambda: [ops.zeros((3, 4)), ops.ones((3, 4))]),
    "nan": (_nan_map, lambda: np.zeros((3, 2))),
}
MAP_PARAMS = [
    pytest.param(name, marks=pytest.mark.float64) if name in ("tanh", "nan") else name
    for name in sorted(MAPS)
]


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("map_name", MAP_PARAMS)
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_object_call_is_bitwise_the_function_call(name, map_name, graph):
    f, z0 = MAPS[map_name]
    settings = {**NON_DEFAULT[name], "max_iter": 25, "tol": 1e-9}
    config = {"class_name": CLASSES[name].__name__, "config": settings}
    calls = [
        lambda z: getattr(solvers, name)(f, z, **settings),
        lambda z: registry.get(name)(f, z, **settings),
        lambda z: CLASSES[name](**settings)(f, z),
        lambda z: solvers.get(name, **settings)(f, z),
        lambda z: solvers.get(config)(f, z),
        lambda z: solvers.get(name)(f, z, **settings),
    ]
    if graph:
        calls = [compiled(call) for call in calls]
    results = [call(z0()) for call in calls]
    for result in results[1:]:
        for got, want in zip(
            keras.tree.flatten(result), keras.tree.flatten(results[0]), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_bare_picard_subclass_is_bitwise_fixed_point(dtype):
    class Picard(solvers.Solver):
        def step(self, f, z, fz, state, k):
            return fz, state

    f = TanhMap(6, 4, norm=0.95, seed=3)
    mine = Picard(max_iter=40, tol=1e-10)(f, np.zeros((4, 6), dtype))
    ref = solvers.FixedPoint(max_iter=40, tol=1e-10)(f, np.zeros((4, 6), dtype))
    for got, want in zip(mine, ref, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert Picard.name is None and "picard" not in registry.names()


# ------------------------------------------------------- registration and the registry
def test_named_subclass_is_reachable_everywhere(monkeypatch):
    monkeypatch.setattr(base.Solver, "_registry", dict(base.Solver._registry))

    class Halving(solvers.Solver):
        name = "halving_test_solver"

        def __init__(self, max_iter=50, tol=1e-4, stop_mode="rel", rate=0.5):
            super().__init__(max_iter, tol, stop_mode)
            self.rate = common.check_fraction("rate", rate)

        def step(self, f, z, fz, state, k):
            return z + self.rate * (fz - z), state

    assert registry.names() == (*SOLVER_NAMES, *AFFINE_SOLVER_NAMES, "halving_test_solver")
    assert type(solvers.get("halving_test_solver", rate=0.25)) is Halving
    fn = registry.get("halving_test_solver")
    assert list(registry.options_of("halving_test_solver")) == ["rate"]
    result = fn(lambda z: 0.5 * z + 1.0, ops.zeros((2, 3)), max_iter=3, tol=1e-9, rate=1.0)
    assert int(result.steps) == 3
    assert registry.check_options("halving_test_solver", {"rate": 0.3}) == {"rate": 0.3}
    with pytest.raises(ValueError, match=re.escape("Received: my_options['rate']=2")):
        registry.check_options("halving_test_solver", {"rate": 2}, "my_options")
    with pytest.raises(ValueError, match="already registered"):

        class Other(solvers.Solver):
            name = "anderson"

    class Sub(solvers.Anderson):
        pass

    assert Sub.name is None and registry.names()[-1] == "halving_test_solver"


@pytest.mark.parametrize(
    "name, key, value",
    [("anderson", "window", 0), ("anderson", "beta", 2), ("fixed_point", "damping", 0)]
    + [("broyden", "memory", -1)],
)
def test_check_options_errors_come_from_the_constructor(name, key, value):
    label = f"solver_options['{key}']"
    with pytest.raises(ValueError, match=re.escape(f"Received: {label}={value!r}")) as info:
        registry.check_options(name, {key: value})
    assert f"`{label}`" in str(info.value)


# ---------------------------------------------- the docs' worked example (a user solver)
@pytest.fixture
def docs_solver(monkeypatch):
    """The first code block of 'Adding a solver' in docs/development.md, executed."""
    monkeypatch.setattr(
        base.Solver, "_registry", dict(base.Solver._registry)
    )  # its `name` registers
    text = DOCS.read_text()
    section = text[text.index("## Adding a solver") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {"__name__": "docs_example"}
    exec(compile(code, str(DOCS), "exec"), namespace)
    return namespace["BacktrackingPicard"]


def backtracking_np(f_np, z0, iters, damping, shrink):
    """The docs example's iterates z_0 .. z_iters, in float64 numpy."""
    z = np.asarray(z0, np.float64)
    a = np.full((z.shape[0], 1), damping)
    last = np.full((z.shape[0], 1), np.inf)
    zs = [z]
    for _ in range(iters):
        g = f_np(z) - z
        residual = np.linalg.norm(g, axis=1, keepdims=True)
        a = np.where(residual > last, a * shrink, a)
        z, last = z + a * g, residual
        zs.append(z)
    return zs


def expansive_map(batch=4, n=5):
    """z A + c with eigenvalues of A in [-2.2, 0.5]: Picard iteration diverges."""
    q, _ = np.linalg.qr(np.random.default_rng(7).standard_normal((n, n)))
    a = q @ np.diag(np.linspace(-2.2, 0.5, n)) @ q.T
    return LinearMap(a, np.random.default_rng(8).standard_normal((batch, n)))


@pytest.mark.float64
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_docs_solver_iterates_best_iterate_and_stopping(docs_solver, stop_mode):
    g = expansive_map()
    f = Recorder(g)
    tol = 1e-8
    solver = docs_solver(max_iter=300, tol=tol, stop_mode=stop_mode, shrink=0.6)
    result = solver(f, np.zeros((4, 5)))
    steps = int(result.steps)
    assert f.calls == steps < 300
    expected = backtracking_np(g.np, np.zeros((4, 5)), steps - 1, 1.0, 0.6)
    for k, (got, want) in enumerate(zip(f.inputs, expected, strict=True)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=f"iterate {k}")
    # Stopped at the first evaluation after which every sample had met tol, each sample
    # returning its first iterate that met it.
    history = f.residual_history(stop_mode)
    met = history <= tol
    assert np.all(met.any(axis=0)) and not np.all(met[:-1].any(axis=0))
    first = np.argmax(met, axis=0)
    np.testing.assert_array_equal(
        np.asarray(result.state), [f.inputs[k][b] for b, k in enumerate(first)]
    )
    assert np.all(np.asarray(result.converged))
    np.testing.assert_allclose(np.asarray(result.state), g.reference(), atol=1e-6)


@pytest.mark.float64
def test_docs_solver_returns_lowest_residual_iterate(docs_solver):
    g = expansive_map()
    f = Recorder(g)
    result = docs_solver(max_iter=6, tol=1e-12, shrink=0.9)(f, np.zeros((4, 5)))
    history = f.residual_history("abs")
    assert f.calls == int(result.steps) == 6 and np.any(np.diff(history, axis=0) > 0)
    best = np.argmin(history, axis=0)
    np.testing.assert_array_equal(
        np.asarray(result.state), [f.inputs[k][b] for b, k in enumerate(best)]
    )
    abs_res, _ = residuals_np(g.np(np.asarray(result.state)), np.asarray(result.state))
    np.testing.assert_allclose(np.asarray(result.abs_residual), abs_res, rtol=1e-12)
    assert not np.any(np.asarray(result.converged))


@pytest.mark.float64
@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_docs_solver_non_finite_sample_is_frozen(docs_solver, bad_value):
    g = expansive_map(batch=3)

    def f(z):
        # Sample 1 blows up once its first entry passes 0.3 on its way to the solution.
        bad = ops.logical_and(np.array([[False], [True], [False]]), ops.abs(z[:, :1]) > 0.3)
        return ops.where(bad, const(bad_value, z), g(z))

    recorder = Recorder(f)
    result = docs_solver(max_iter=300, tol=1e-8)(recorder, np.zeros((3, 5)))
    state = np.asarray(result.state)
    assert np.all(np.isfinite(state)) and np.all(np.isfinite(flat(recorder.inputs)))
    np.testing.assert_array_equal(np.asarray(result.nonfinite), [False, True, False])
    np.testing.assert_array_equal(np.asarray(result.converged), [True, False, True])
    np.testing.assert_allclose(state[[0, 2]], g.reference()[[0, 2]], atol=1e-6)
    assert abs(state[1, 0]) <= 0.3 and int(result.steps) < 300
    # Alone, the good samples take the same path.
    alone = docs_solver(max_iter=300, tol=1e-8)(LinearMap(g.a, g.c[[0, 2]]), np.zeros((2, 5)))
    np.testing.assert_allclose(state[[0, 2]], np.asarray(alone.state), rtol=1e-12, atol=1e-14)


def test_docs_solver_serializes_and_is_reachable_by_name(docs_solver):
    solver = docs_solver(max_iter=20, shrink=0.25)
    restored = solvers.get(json.loads(json.dumps(solvers.serialize(solver))))
    assert type(restored) is docs_solver and restored.get_config() == solver.get_config()
    assert type(solvers.get("backtracking_picard")) is docs_solver
    with pytest.raises(ValueError, match=re.escape("Received: shrink=0")):
        docs_solver(shrink=0)
