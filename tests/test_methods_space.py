"""The method axis of a search space (``grid.method``): each method's knobs validated and swept with it alone, the
trials' labels, params and configs, the conditional search space, and one line, exit 2, for a bad key."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import ray
import yaml

from kd_tune.cli.app import main
from kd_tune.space.methods import METHODS, canonical_knobs, variant
from kd_tune.space.parse import parse_space, space_to_yaml
from kd_tune.space.trials import TrialConfig, TrialPoint, encode_point

from .conftest import tiny_space

GRID = {"alpha": [0.1, 0.5], "temperature": [4.0], "epochs": [1, 2], "seed": [0, 1]}


def space(methods: list[Any], **grid: Any) -> dict[str, Any]:
    return tiny_space(grid={**GRID, **grid, "method": methods}, baselines=["scratch"])


def test_no_method_axis_is_todays_grid() -> None:
    """Without grid.method every trial is kd with its defaults, with the labels of before (runs and folders of sweeps
    started before the axis existed keep their names)."""
    spec = parse_space(tiny_space(grid=GRID, baselines=["scratch"]), "x.yaml")
    assert [t.label for t in spec.trials()] == ["a0.1-T4-e1+2-s0", "a0.1-T4-e1+2-s1", "a0.5-T4-e1+2-s0", "a0.5-T4-e1+2-s1",
                                                "scratch-e1+2-s0", "scratch-e1+2-s1"]
    assert {(t.method, t.knobs) for t in spec.trials()} == {("kd", (("divergence", "forward_kl"), ("standardize", False)))}
    # A config stored by a sweep from before the axis decodes to kd with its defaults.
    old = {"point": {"role": "student", "alpha": 0.1, "temperature": 4.0, "epochs": 2, "seed": 0, "milestones": [1, 2]}}
    assert TrialConfig.decode(old).point == spec.trials()[0]


def test_each_method_sweeps_its_own_knobs() -> None:
    spec = parse_space(space(["kd", {"method": "dkd", "alpha": 1.0, "nckd_weight": [2.0, 8.0], "warmup": 5},
                              {"method": "kd", "standardize": True, "temperature": [2.0]},
                              {"method": "dist", "alpha": [1.0], "inter_weight": [1.0, 2.0]}]), "x.yaml")
    students = [t for t in spec.trials() if t.role == "student"]
    by_method: dict[str, list[TrialPoint]] = {}
    for t in students:
        by_method.setdefault(t.variant, []).append(t)
    # kd: the grid's 2 alphas x 1 T x 2 seeds; dkd: its own alpha 1 x 2 nckd_weights x 2 seeds; kd+ls: 2 alphas at its own T 2.
    assert {v: len(ts) for v, ts in by_method.items()} == {"kd": 4, "dkd": 4, "kd+ls": 4, "dist": 4}
    assert {t.alpha for t in by_method["dkd"]} == {1.0} and {dict(t.knobs)["nckd_weight"] for t in by_method["dkd"]} == {2.0, 8.0}
    assert all(dict(t.knobs) == {"tckd_weight": 1.0, "nckd_weight": dict(t.knobs)["nckd_weight"], "warmup": 5, "standardize": False}
               for t in by_method["dkd"])
    assert {t.temperature for t in by_method["kd+ls"]} == {2.0}
    # DKD's knobs are never swept for kd, nor kd's for DKD.
    assert all(set(dict(t.knobs)) == {"divergence", "standardize"} for t in by_method["kd"] + by_method["kd+ls"])
    # Scratch stays one per student and seed, whatever the methods.
    assert sorted(t.label for t in spec.trials() if t.role == "scratch") == ["scratch-e1+2-s0", "scratch-e1+2-s1"]
    labels = [t.label for t in spec.trials()]
    assert len(set(labels)) == len(labels)
    assert "dkd-nw2-wu5-a1-T4-e1+2-s0" in labels and "dkd-wu5-a1-T4-e1+2-s1" in labels and "kd-ls-a0.1-T2-e1+2-s0" in labels
    assert "dist-bw2-a1-T4-e1+2-s0" in labels
    # The run's params carry the method and each of its knobs.
    point = next(t for t in students if t.label.startswith("dkd-nw2"))
    assert point.at(1).grid_config() == {"role": "student", "alpha": 1.0, "temperature": 4.0, "epochs": 1, "seed": 0, "label_noise": 0.0,
                                         "method": "dkd", "tckd_weight": 1.0, "nckd_weight": 2.0, "warmup": 5, "standardize": False}
    # Tune's config round-trips every member of a mixed-method grid.
    assert [TrialConfig.decode(encode_point(t)).point for t in spec.trials()] == spec.trials()
    # What is stored beside the sweep reads back to the same grid.
    assert parse_space(yaml.safe_load(space_to_yaml(spec)), "stored").grid == spec.grid


def test_packs_mix_methods() -> None:
    """Members of different methods share a pack (a pack computes each member's own loss from its logits)."""
    spec = parse_space({**space(["kd", {"method": "dkd", "alpha": 1.0}]), "resources": {"cpu": 1, "pack": 8}}, "x.yaml")
    packs = spec.packs()
    assert len(packs) == 1 and {p.method for p in packs[0]} == {"kd", "dkd"} and len(packs[0]) == 8


def test_skew_only_with_a_skewed_divergence_and_drops_where_it_does_not_apply() -> None:
    spec = parse_space(space([{"method": "kd", "divergence": ["forward_kl", "skew_kl"], "skew": [0.1, 0.3]}], alpha=[0.5], seed=[0]), "x.yaml")
    knobs = [dict(t.knobs) for t in spec.trials() if t.role == "student"]
    # forward_kl has no skew: once, not once per skew value.
    assert knobs == [{"divergence": "forward_kl", "standardize": False}, {"divergence": "skew_kl", "skew": 0.1, "standardize": False},
                     {"divergence": "skew_kl", "skew": 0.3, "standardize": False}]


def test_alpha_1_repeats_scratch_for_kd_only() -> None:
    """kd at alpha 1 weights its teacher term 0 (the scratch student); dkd at alpha 1 still distills."""
    spec = parse_space(space(["kd", {"method": "dkd"}], alpha=[1.0], seed=[0]), "x.yaml")
    repeated = spec.repeated_trainings()
    assert [[t.label for t in g] for g in repeated] == [["a1-T4-e1+2-s0", "scratch-e1+2-s0"]]


def test_method_helpers_agree_with_the_registry() -> None:
    assert set(METHODS) == {"kd", "dkd", "dist"}
    for m in METHODS.values():
        assert m.main_knob in (*m.knob_names, "alpha", "temperature")
        assert canonical_knobs(m.name) == tuple((k.name, k.default) for k in m.knobs if k.applies is None or k.applies({}))
    assert variant("kd", canonical_knobs("kd", {"standardize": True})) == "kd+ls"
    assert variant("kd", canonical_knobs("kd", {"divergence": "js"})) == "kd+js"
    assert variant("dkd", canonical_knobs("dkd", {"nckd_weight": 2.0})) == "dkd"


BAD = [
    (["dkdd"], "key 'grid.method[0].method': bad value 'dkdd'; allowed: one of kd, dkd, dist"),
    # A key of another method: one line naming the method and its keys.
    ([{"method": "kd", "nckd_weight": 2.0}], "key 'grid.method[0].nckd_weight': bad value 2.0; allowed: a key of method kd: method, alpha, "
                                             "temperature, divergence, skew, standardize"),
    ([{"method": "dkd", "beta": 2.0}], "key 'grid.method[0].beta': bad value 2.0; allowed: a key of method dkd: method, alpha, temperature, "
                                       "tckd_weight, nckd_weight, warmup, standardize"),
    ([{"method": "dist", "intra_weight": [1.0, -1.0]}], "key 'grid.method[0].intra_weight[1]': bad value -1.0; allowed: a number in [0, inf]"),
    ([{"method": "dkd", "warmup": 2.5}], "key 'grid.method[0].warmup': bad value 2.5; allowed: an integer in [0, 10000]"),
    ([{"method": "kd", "divergence": "kl"}], "key 'grid.method[0].divergence': bad value 'kl'; allowed: one of forward_kl, reverse_kl, js, "
                                             "skew_kl, skew_reverse_kl"),
    ([{"method": "kd", "skew": 0.2}], "key 'grid.method[0].skew': bad value 0.2; allowed: no skew without a skewed divergence"),
    ([{"method": "kd", "divergence": "skew_kl", "skew": 1.0}], "key 'grid.method[0].skew': bad value 1.0; allowed: a number in (0, 1)"),
    ([{"method": "kd", "standardize": "yes"}], "key 'grid.method[0].standardize': bad value 'yes'; allowed: true or false"),
    ([{"method": "kd", "alpha": [1.5]}], "key 'grid.method[0].alpha[0]': bad value 1.5; allowed: a number in [0, 1]"),
    ([{"method": "dist", "inter_weight": {"low": 1, "high": 2}}], "key 'grid.method[0].inter_weight': bad value {'low': 1, 'high': 2}; "
                                                                  "allowed: a number in [0, inf], or a list of such (a range"),
    (["kd", {"method": "kd", "divergence": "forward_kl"}], "key 'grid.method[1]': bad value {'method': 'kd', 'divergence': 'forward_kl'}; "
                                                           "allowed: an entry whose trials are its own: grid.method[0] also gives a0.1-T4"),
    ("kd", "key 'grid.method': bad value 'kd'; allowed: a non-empty list of methods (kd, dkd, dist)"),
]


@pytest.mark.parametrize("methods,expected", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_method_key_exits_2_with_one_line(methods: Any, expected: str, write_space: Callable[..., Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_space(space(methods))
    monkeypatch.chdir(tmp_path)
    before = {str(p) for p in tmp_path.rglob("*")}
    assert main(["sweep", str(path), "--storage", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"kd-tune sweep: error: {path}: ") and expected in err[0], err[0]
    assert len(err) == 2
    assert not ray.is_initialized()
    assert {str(p) for p in tmp_path.rglob("*")} == before  # nothing written


def _search(methods: list[Any], **grid: Any) -> Any:
    data = space(methods, **grid)
    data["search"] = {"algorithm": "random", "num_samples": 40, "seed": 3}
    return parse_space(data, "x.yaml")


def test_search_samples_each_methods_knobs_conditionally() -> None:
    """The define-by-run space samples a method, then only that method's knobs, from their ranges; every suggestion is a
    valid trial config."""
    from kd_tune.sweep.search import MethodSpace, param_space

    spec = _search(["kd", {"method": "dkd", "alpha": 1.0, "nckd_weight": {"low": 1.0, "high": 10.0, "log": True}, "warmup": {"low": 0, "high": 5}},
                    {"method": "kd", "divergence": ["reverse_kl", "js"]}], alpha={"low": 0.0, "high": 1.0})
    assert param_space(spec) == {}  # the searcher's own space samples everything
    space_fn = MethodSpace(spec)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen: dict[str, int] = {}
    for _ in range(60):
        trial = study.ask()
        point = TrialConfig.decode(space_fn(trial)).point
        seen[point.variant] = seen.get(point.variant, 0) + 1
        if point.method == "dkd":
            knobs = dict(point.knobs)
            assert point.alpha == 1.0 and 1.0 <= knobs["nckd_weight"] <= 10.0 and knobs["warmup"] in range(6)
            assert set(trial.params) == {"method", "dkd.nckd_weight", "dkd.warmup", "temperature", "epochs", "seed"} - {"temperature"}
        else:
            assert 0.0 <= point.alpha <= 1.0 and "nckd_weight" not in dict(point.knobs)
            assert not any(name.startswith("dkd.") for name in trial.params)
        study.tell(trial, point.alpha)
    assert set(seen) == {"kd", "dkd", "kd+reverse_kl", "kd+js"}
    # OptunaSearch pickles the space with its state (Tuner.restore): it must survive a round trip.
    import pickle

    again = pickle.loads(pickle.dumps(space_fn))
    assert again.names == ["kd.1", "dkd", "kd.2"]


def test_plan_names_the_methods(write_space: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = write_space(space(["kd", {"method": "dkd", "alpha": 1.0, "nckd_weight": [2.0, 8.0]}]))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "kd: 8 grid points; distillation weighted by 1 - alpha" in out
    assert "dkd: 8 grid points; distillation weighted by its own" in out
    assert "dkd-nw2-a1-T4-e1+2-s0" in out
