"""--lr auto: the grid follows the rule of thumb for method, rank and objective; the probe picks the value with the
lowest held-out figure unless a larger one is within the margin, and the run continues from that probe (the
adapter equals a plain run at that learning rate); a winner at the edge widens the grid once; a diverging probe
loses, and so does one no better than the model before training (the grid then widens downwards until one is); a
run killed during the probe resumes bit-identically; the choice is in the manifest, metrics.jsonl and the CLI's
report."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import (assert_sigkill_resume_is_bit_identical, even_odd_records, make_model, make_tokenizer,
                      recover_worker, tiny_recover_config)
from safetensors.torch import load_file

from rora.config import RecoverConfig
from rora.errors import TrainingError
from rora.recovery import lr_auto
from rora.recovery.lr_auto import LrSearch, probe_steps, rule_of_thumb
from rora.recovery.methods import effective_scale
from rora.recovery.trainer import recover

pytestmark = pytest.mark.usefixtures("one_thread")


def auto_config(**kw):
    return tiny_recover_config(**{"objective": "kd", "lr": "auto", "lr_probe_steps": 2, "max_steps": 6,
                                  "eval_steps": 2, "save_steps": 2, **kw})


def _student():
    """The teacher with its MLPs halved: something to recover."""
    model = make_model(seed=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mlp" in name:
                p.mul_(0.5)
    return model


def _grid(**kw) -> list[float]:
    cfg = RecoverConfig(**kw)
    return LrSearch.start(cfg, effective_scale(cfg), 1000).grid


def test_the_grid_follows_the_rule_of_thumb_for_method_rank_and_objective():
    assert _grid(method="rora", rank=16, objective="kd") == [8e-4, 2e-3, 5e-3]  # the quickstart's measured 2e-3
    # LoRA's best learning rate falls as 1/sqrt(r), RoRA's (scale alpha/sqrt(r)) as 1/r; sft sits lower than kd.
    assert rule_of_thumb("kd", 2.0, 8) / rule_of_thumb("kd", 2.0, 128) == pytest.approx(4, rel=0.02)
    rora = [effective_scale(RecoverConfig(method="rora", rank=r)) for r in (8, 128)]
    assert rule_of_thumb("kd", rora[0], 8) / rule_of_thumb("kd", rora[1], 128) == pytest.approx(16, rel=0.05)
    assert _grid(method="rora", rank=8, objective="sft")[1] == 2e-3 and _grid(objective="sft")[1] < _grid(objective="kd")[1]
    assert _grid(method="dora", rank=8, objective="kd") == _grid(method="lora", rank=8, objective="kd")
    quick = RecoverConfig(warmup_steps=3)
    assert probe_steps(quick, 24) == 6 and probe_steps(RecoverConfig(warmup_steps=100), 30000) == 105
    assert probe_steps(RecoverConfig(lr_probe_steps=3), 24) == 3 and probe_steps(quick, 4) == 2
    assert probe_steps(quick, 1) == 1


def _result(lr, figure):
    return {"lr": lr, "val_loss": figure, "steps": 2, "seconds": 1.0, "tokens": 10}


@pytest.mark.parametrize("figures, widened_to, chosen", [
    ({8e-4: 0.5, 2e-3: 0.4, 5e-3: 0.6}, None, 2e-3),  # inside the grid: no more probes
    ({8e-4: 0.3, 2e-3: 0.4, 5e-3: 0.6, 3.2e-4: 0.35}, 3.2e-4, 8e-4),  # the low end won: one below, which loses
    ({8e-4: 0.5, 2e-3: 0.4, 5e-3: 0.3, 1.3e-2: 0.2}, 1.3e-2, 1.3e-2),  # the high end won, and again: accepted
    ({8e-4: None, 2e-3: None, 5e-3: None, 3.2e-4: 0.9}, 3.2e-4, 3.2e-4),  # all diverged: smaller steps
    ({8e-4: 0.40, 2e-3: 0.41, 5e-3: 0.6}, None, 2e-3),  # the larger value within the margin (5%) leads: no widening
    ({8e-4: 0.40, 2e-3: 0.43, 5e-3: 0.6, 3.2e-4: 0.39}, 3.2e-4, 8e-4),  # 7.5% worse: the smaller leads; 3.2e-4 is
                                                                        # better by less than the margin
])
def test_a_winner_at_the_edge_widens_the_grid_once(figures, widened_to, chosen):
    search = LrSearch([8e-4, 2e-3, 5e-3], 2, "kd")
    probed = []
    while (lr := search.next_lr()) is not None:
        probed.append(lr)
        search.results.append(_result(lr, figures[lr]))
    assert probed == [8e-4, 2e-3, 5e-3] + ([widened_to] if widened_to else [])
    assert search.choose() == chosen and search.widened == (widened_to is not None)
    summary = search.summary()
    assert summary["at_edge"] == (chosen == widened_to) and summary["extra_steps"] == 2 * (len(probed) - 1)
    assert search.next_lr() is None  # widened once, never twice
    everything_diverged = LrSearch([1e-3], 2, "kd", [_result(1e-3, None), _result(4e-4, None)], widened=True)
    with pytest.raises(TrainingError, match="every --lr auto probe diverged"):
        everything_diverged.choose()


def test_auto_picks_the_leading_probe_and_continues_from_it(tokenizer, tmp_path):
    teacher = make_model(seed=4)
    auto = recover(_student(), tokenizer, even_odd_records(), auto_config(), tmp_path / "auto", progress=False,
                   teacher=teacher)
    probes = auto.lr_auto["probes"]
    assert [p["lr"] for p in probes] == auto.lr_auto["grid"] and len(probes) == 3 and not auto.lr_auto["widened"]
    assert auto.lr == LrSearch(auto.lr_auto["grid"], 2, "kd", probes).leader()["lr"]
    assert auto.lr_auto["figure"] == "val_kl"
    assert all(p["val_loss"] < auto.lr_auto["start"] for p in probes if p["lr"] == auto.lr)  # it beat the start
    assert auto.lr != auto.lr_auto["grid"][-1] or auto.lr_auto["widened"]
    # The continued run is exactly a run at the chosen learning rate: the probe was its first steps.
    fixed = recover(_student(), tokenizer, even_odd_records(), auto_config(lr=auto.lr), tmp_path / "fixed",
                    progress=False, teacher=teacher)
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("auto", "fixed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (auto.best_val_loss, auto.best_step) == (fixed.best_val_loss, fixed.best_step)
    report = json.loads((tmp_path / "auto" / "rora.json").read_text())["report"]
    assert report["lr"] == auto.lr and report["lr_auto"] == auto.lr_auto and report["steps"] == 6
    assert report["lr_auto"]["extra_steps"] == 4 and report["lr_auto"]["probe_steps"] == 2
    logged = [json.loads(line) for line in (tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 7))  # the losing probes' steps are gone
    assert [r["lr_auto"] for r in logged if "lr_auto" in r] == [auto.lr_auto]
    assert not (tmp_path / "auto" / "checkpoints" / "probe").exists()


def test_a_winner_at_the_edge_widens_the_grid_in_a_run(tokenizer, monkeypatch):
    monkeypatch.setitem(lr_auto.CENTRE, "kd", 1e-5)  # a centre far too small: the largest value wins, then beyond it
    teacher = make_model(seed=4)
    run = recover(_student(), tokenizer, even_odd_records(), auto_config(max_steps=4), progress=False, teacher=teacher)
    grid = run.lr_auto["grid"]
    assert len(run.lr_auto["probes"]) == 4 and run.lr_auto["widened"] and run.lr == max(grid) == grid[-1]
    assert run.lr == pytest.approx(sorted(grid)[-2] * lr_auto.FACTOR, rel=0.05) and run.lr_auto["at_edge"]


def _poison_probe(monkeypatch, index: int) -> None:
    """The probe of the initial grid's value `index` gets a non-finite loss at its second step."""
    from rora.recovery import trainer

    real = trainer._Run.train_step

    def poisoned(self, micro_batches):
        if self.optimizer.param_groups[0]["initial_lr"] == self.search.grid[index] and self.step == 1:
            raise trainer.NonFiniteLoss("loss became nan")
        return real(self, micro_batches)

    monkeypatch.setattr(trainer._Run, "train_step", poisoned)


def test_a_diverging_probe_loses(tokenizer, monkeypatch):
    _poison_probe(monkeypatch, 1)
    run = recover(_student(), tokenizer, even_odd_records(), auto_config(), progress=False, teacher=make_model(seed=4))
    middle = run.lr_auto["probes"][1]  # probed in order: the initial grid's centre second
    assert middle["val_loss"] is None and middle["diverged_at"] == 2 and run.lr != middle["lr"]


@pytest.mark.parametrize("figures, below, chosen", [
    ({8e-4: 1.9, 2e-3: 1.5, 5e-3: None}, [], 2e-3),  # probes that beat the start (2.13) lead as before
    ({8e-4: 9.05, 2e-3: 5.38, 5e-3: 6.11, 3.2e-4: 1.9}, [3.2e-4], 3.2e-4),  # ratio 0.5's grid: all worse than
    ({8e-4: 9.05, 2e-3: 5.38, 5e-3: 6.11, 3.2e-4: 2.5, 1.3e-4: 2.2, 5.2e-5: 2.0}, [3.2e-4, 1.3e-4, 5.2e-5], 5.2e-5),
])
def test_probes_no_better_than_the_start_lose_and_the_grid_widens_down_until_one_is(figures, below, chosen):
    """A probe must beat the model before training: a rate that makes it worse is no candidate, however it compares
    with the other probes; while none does, smaller rates are tried, BELOW_START at most."""
    search = LrSearch([8e-4, 2e-3, 5e-3], 2, "kd", start_loss=2.13)
    probed = []
    while (lr := search.next_lr()) is not None:
        probed.append(lr)
        search.results.append(_result(lr, figures[lr]))
    assert probed == [8e-4, 2e-3, 5e-3] + below
    assert search.choose() == chosen and search.summary()["start"] == 2.13
    assert "before training 2.1300" in lr_auto.describe(search.summary())


def test_when_no_rate_beats_the_start_the_search_stops_in_one_line():
    search = LrSearch([8e-4, 2e-3, 5e-3], 2, "kd", start_loss=2.13)
    while (lr := search.next_lr()) is not None:
        search.results.append(_result(lr, 3.0))
    assert len(search.results) == 3 + lr_auto.BELOW_START
    with pytest.raises(TrainingError, match=r"no --lr auto probe improved on the model before training "
                                            r"\(validation figure 2.1300; learning rates 5.2e-05, 0.00013"):
        search.choose()


def test_a_first_probe_that_never_leads_is_recorded_in_a_run_with_an_output(tokenizer, monkeypatch, tmp_path):
    """The first probe diverges, so no probe has led yet when it ends (no probe checkpoint to carry its record):
    the run goes on, and its report keeps the probe's figure."""
    _poison_probe(monkeypatch, 0)
    run = recover(_student(), tokenizer, even_odd_records(), auto_config(), tmp_path / "run", progress=False,
                  teacher=make_model(seed=4))
    first = run.lr_auto["probes"][0]
    assert first["val_loss"] is None and run.lr != first["lr"] and run.steps == 6
    assert json.loads((tmp_path / "run" / "rora.json").read_text())["report"]["lr_auto"]["probes"][0] == first


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto-worker")
    _student().save_pretrained(root / "student")
    make_tokenizer().save_pretrained(root / "student")
    make_model(seed=4).save_pretrained(root / "teacher")
    make_tokenizer().save_pretrained(root / "teacher")
    (root / "data.json").write_text(json.dumps(even_odd_records(40)))
    return root


def test_sigkill_during_the_probe_resumes_bit_identically(saved, tmp_path):
    cfg = auto_config(max_steps=6).to_dict()

    def worker(out, **env):
        return recover_worker(saved, saved / "student", saved / "teacher", out, cfg, **env)

    full, resumed = assert_sigkill_resume_is_bit_identical(worker, tmp_path / "full", tmp_path / "killed", steps=6,
                                                           kill_at="checkpoints/probe")
    for run in (full, resumed):  # seconds differ between the runs; every figure and choice is the same
        for p in run["lr_auto"]["probes"]:
            p.pop("seconds")
        run["lr_auto"].pop("extra_seconds")
    assert resumed["lr_auto"] == full["lr_auto"] and len(full["lr_auto"]["probes"]) >= 3


def test_cli_recover_lr_auto_reports_the_choice(saved, tmp_path):
    from click.testing import CliRunner

    from rora.cli import main

    out = tmp_path / "cli"
    done = CliRunner().invoke(main, ["recover", str(saved / "student"), "--teacher", str(saved / "teacher"), "--data",
                                     str(saved / "data.json"), "--out", str(out), "--rank", "4", "--max-steps", "4",
                                     "--batch-size", "4", "--micro-batch-size", "2", "--val-set-size", "4",
                                     "--warmup-steps", "0", "--lr", "auto", "--lr-probe-steps", "1"])
    assert done.exit_code == 0, done.output
    report = json.loads((out / "rora.json").read_text())["report"]
    assert f"learning rate  lr auto chose {report['lr']:g} (val_kl after 1 steps:" in done.output
    assert json.loads((out / "rora.json").read_text())["config"]["lr"] == "auto"
