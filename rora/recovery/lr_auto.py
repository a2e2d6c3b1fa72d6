"""`--lr auto`: the learning rate chosen by a short probe instead of by hand.

The grid: three values a factor FACTOR apart around a rule of thumb for the method, rank and objective,

    centre = C[objective] / (scale * sqrt(rank)),    scale = alpha / rank**b (the adapter's effective scale).

Adam moves each adapter weight by about the learning rate per step, so the update B @ A grows with sqrt(rank) (a sum
of `rank` terms of random sign) and is multiplied by the scale: the centre keeps that product fixed. It reproduces
how the measured best learning rates move (BENCHMARKS.md, "rank question under distillation" and "rank sweep"):
LoRA's falls as 1/sqrt(r), RoRA's (whose scale grows as sqrt(r)) as 1/r. C is anchored on the quickstart's
hand-picked value (kd, RoRA rank 16, alpha 32: 2e-3, from three probes on held-out KL) and, for sft, on the rank
sweep's best values (RoRA rank 8 and 128: 2e-3 and 2e-4).

Each value trains for a few optimizer steps (the same schedule, warmup and data order as the full run, from the same
initial adapter) and is scored on the validation split: the objective's own held-out figure (KL for kd, response
loss for sft). The probes are read in order, and the leader changes only to the probe just finished: a larger
learning rate takes the lead unless its figure is worse than the leader's by more than MARGIN, a smaller one only
if it is better by more than MARGIN. A probe of a few steps favours small learning rates (the short-horizon bias
of greedy learning-rate selection: a larger rate's gain comes later in the run), and this is what the margin
corrects: in benchmarks/bench_lr_auto.py (16-step kd runs, 4-step probes) the lowest probe figure pointed 2.5x
below the best full run for LoRA and RoRA at rank 8, where the next larger value, the full runs' best, was within
2.5-3.2% of it at the probe; at rank 128 both rules choose the same value. A leader at either end of the grid
widens it once, by one more value beyond that end, rather than being accepted silently. The run then continues from
the leading probe's state, so the full run is exactly a run with that learning rate and the probe costs only the
other probes' steps. A probe whose loss becomes non-finite loses, and so does one that ends no better than the
model before any training (the validation figure measured once before the first probe): a rate that makes the
model worse is no candidate, however it compares with the others. While no probe has beaten the start, the grid
widens downwards, up to BELOW_START values past its end (at ratio 0.5 the quickstart's whole grid made the model
worse, and a rate 4x below its smallest value helped: BENCHMARKS.md, "Reconstruction"); if none does, the run
stops with one line asking for a smaller --lr.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..errors import TrainingError

FACTOR = 2.5  # between neighbouring values of the grid
CENTRE = {"kd": 0.064, "kd+sft": 0.064, "sft": 0.032}  # C above, per objective
MARGIN = 0.05  # the share by which the probe figures must differ to overrule the preference for the larger rate
PROBE_STEPS = (8, 5)  # an unset probe length: at least 8 steps, and 5 past the warmup
BELOW_START = 3  # values tried below the grid while no probe beats the model before training


def rule_of_thumb(objective: str, scale: float, rank: int) -> float:
    """The grid's centre (see the module docstring)."""
    return _round(CENTRE[objective] / (scale * math.sqrt(rank)))


def initial_grid(centre: float) -> list[float]:
    return [_round(centre / FACTOR), centre, _round(centre * FACTOR)]


def probe_steps(config, total_steps: int) -> int:
    """Steps per probe: config.lr_probe_steps, else past the warmup (at least 8) but at most a quarter of the run,
    and at least 2 (a warmup's first step has learning rate 0: one step would tell the values apart by nothing);
    never more than the run."""
    if config.lr_probe_steps is not None:
        return min(config.lr_probe_steps, total_steps)
    least, past_warmup = PROBE_STEPS
    return max(min(2, total_steps), min(max(least, config.warmup_steps + past_warmup), total_steps // 4))


def _round(lr: float) -> float:
    """Two significant digits, so the grid reads as it is meant (8e-4, 2e-3, 5e-3)."""
    return float(f"{lr:.2g}")


@dataclass
class LrSearch:
    """The probe's state: the grid, the figures of the probes done so far (in order), whether the grid was widened,
    and the chosen learning rate once every probe is done. Saved in every checkpoint, so a resumed run continues
    the search where it stopped."""

    grid: list[float]
    steps: int
    objective: str
    results: list[dict] = field(default_factory=list)  # {"lr", "val_loss" (None: diverged), figures, cost}
    widened: bool = False
    lr: float | None = None  # the choice
    start_loss: float | None = None  # the validation figure before any training (None: not measured)
    below: int = 0  # values added below the grid because no probe beat the start

    @classmethod
    def start(cls, config, scale: float, total_steps: int) -> "LrSearch":
        centre = rule_of_thumb(config.objective, scale, config.rank)
        return cls(initial_grid(centre), probe_steps(config, total_steps), config.objective)

    @classmethod
    def from_dict(cls, data: dict) -> "LrSearch":
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def done(self) -> bool:
        return self.lr is not None

    def next_lr(self) -> float | None:
        """The next value to probe: the grid's values in order, then one beyond the winning end (once); None when
        the search is over."""
        tried = [r["lr"] for r in self.results]
        for lr in self.grid:
            if lr not in tried:
                return lr
        lead = self.leader()
        low, high = min(self.grid), max(self.grid)
        if lead is None and self.below < BELOW_START:  # every probe diverged or made the model worse
            self.below += 1
            return self._widen(_round(low / FACTOR))
        if self.widened:
            return None
        if lead["lr"] == low:  # smaller steps may be better still (lead is set: the branch above took None)
            return self._widen(_round(low / FACTOR))
        if lead["lr"] == high:
            return self._widen(_round(high * FACTOR))
        return None

    def _widen(self, lr: float) -> float:
        self.grid.append(lr)
        self.widened = True
        return lr

    def leader(self) -> dict | None:
        """The leading probe (see the module docstring): only the last probe can have just taken the lead, so the
        trainer keeps one probe's state; None while every probe diverged."""
        lead = None
        for r in self.results:
            if self.improves(r) and (lead is None or _takes_lead(r, lead)):
                lead = r
        return lead

    def improves(self, probe: dict) -> bool:
        """The probe finished below the model's figure before training (when that was measured)."""
        return probe["val_loss"] is not None and (self.start_loss is None or probe["val_loss"] < self.start_loss)

    def choose(self) -> float:
        lead = self.leader()
        if lead is None:
            rates = ", ".join(map(_fmt, sorted(self.grid)))
            if all(r["val_loss"] is None for r in self.results):
                raise TrainingError(f"every --lr auto probe diverged (learning rates {rates}); give a smaller --lr")
            raise TrainingError(f"no --lr auto probe improved on the model before training (validation figure "
                                f"{self.start_loss:.4f}; learning rates {rates}); give a smaller --lr")
        self.lr = lead["lr"]
        return self.lr

    @property
    def at_edge(self) -> bool:
        """The choice is at an end of the (widened) grid: a value beyond it might still be better."""
        return self.lr is not None and self.lr in (min(self.grid), max(self.grid))

    def summary(self) -> dict:
        """For the manifest, metrics.jsonl and the pipeline summary: the grid, every probe's figures, the choice
        and what the losing probes cost."""
        losers = [r for r in self.results if r["lr"] != self.lr]
        return {"grid": sorted(self.grid), "probe_steps": self.steps, "objective": self.objective,
                "figure": "val_kl" if self.objective == "kd" else "val_response_loss" if self.objective == "sft"
                else "val_loss",
                "probes": self.results, "start": self.start_loss, "lr": self.lr, "widened": self.widened,
                "at_edge": self.at_edge,
                "extra_steps": sum(r["steps"] for r in losers),
                "extra_seconds": round(sum(r["seconds"] for r in losers), 3),
                "extra_tokens": sum(r["tokens"] for r in losers)}


def describe(summary: dict) -> str:
    """One line: the choice among the probes and their figures, and the cost."""
    figures = ", ".join(f"{_fmt(r['lr'])}: " + ("diverged" if r["val_loss"] is None else f"{r['val_loss']:.4f}")
                        for r in sorted(summary["probes"], key=lambda r: r["lr"]))
    edge = "; at the edge of the widened grid" if summary["at_edge"] else ""
    start = f"; before training {summary['start']:.4f}" if summary.get("start") is not None else ""
    return (f"lr auto chose {_fmt(summary['lr'])} ({summary['figure']} after {summary['probe_steps']} steps: "
            f"{figures}{start}{edge}; the other probes cost {summary['extra_steps']} steps, "
            f"{summary['extra_seconds']:.0f} s)")


def _takes_lead(probe: dict, lead: dict) -> bool:
    if probe["lr"] > lead["lr"]:
        return probe["val_loss"] < lead["val_loss"] * (1 + MARGIN)
    return probe["val_loss"] * (1 + MARGIN) < lead["val_loss"]


def _fmt(lr: float) -> str:
    return f"{lr:g}"
