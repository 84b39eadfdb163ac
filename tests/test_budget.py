"""train.time_budget: the run times its first steps and an evaluation, plans its step count to end
inside the budget with the learning rate at zero on its last step, plans again from the steps timed
since, and keeps its plan on resume."""

from __future__ import annotations

import json
import statistics
import time

import pytest

from raytag.trainer.budget import RESERVE, epoch_ends, plan_steps
from raytag.trainer.config import ConfigError, load_config, parse_duration
from tests.helpers import DEMO, cli, run_records
from tests.helpers import train_demo as run

# 200 sentences (14 steps an epoch); train.epochs far beyond what the budget holds: it does not bound
# a budgeted run. log_every=1: every step's learning rate is in metrics.jsonl.
SMALL = [
    "data.max_train_samples=200",
    "data.max_eval_samples=32",
    "data.test=null",
    "train.batch_tokens=256",
    "train.log_every=1",
    "train.epochs=1000",
]


def test_durations_parse_and_bad_ones_name_the_key():
    assert [parse_duration(v) for v in ("90s", "45m", "2h", "1h30m", "1.5h", "1h 30m", "90", 2.5)] == [
        90,
        2700,
        7200,
        5400,
        5400,
        5400,
        90,
        2.5,
    ]
    assert load_config(None, ["train.time_budget=45m"]).train.time_budget == "45m"
    assert parse_duration(load_config(None, ["train.time_budget=90"]).train.time_budget) == 90
    assert load_config(None, []).train.time_budget is None
    for bad, why in [
        ("abc", "expected a duration such as 90s, 45m"),
        ("1m30h", "expected a duration"),
        ("5x", "expected a duration"),
        ("0", "must be a duration > 0"),
        ("-5m", "expected a duration"),
        ("inf", "must be a duration > 0"),
    ]:
        with pytest.raises(ConfigError, match=f"train.time_budget: {why}"):
            load_config(None, [f"train.time_budget={bad}"])
    # A schedule or optimizer of DeepSpeed's own replaces the schedule the budget plans.
    with pytest.raises(ConfigError, match=r"train.time_budget: .*train.deepspeed.scheduler replaces it"):
        load_config(None, ["train.time_budget=5m", "train.deepspeed={scheduler: {type: WarmupLR}}"])
    with pytest.raises(ConfigError, match=r"train.time_budget: .*train.deepspeed.optimizer"):
        load_config(None, ["train.time_budget=5m", "train.deepspeed={optimizer: {type: AdamW}}"])


def test_the_plan_is_the_last_step_whose_steps_and_evaluations_fit():
    def plan(seconds, done=0, into=0, eval_s=5.0, save_s=0.0, eval_every=None, save_every=None, cap=None):
        ends = epoch_ends(done, done // 10, into, lambda epoch: 10)  # 10 steps an epoch
        return plan_steps(done, seconds, 1.0, eval_s, save_s, ends, eval_every, save_every, cap)

    # 1 s a step, 5 s an evaluation at each epoch end and at the last step: step 65 costs
    # 65 + 6 x 5 (steps 10..60) + 5 = 100 s; step 66 would cost 101.
    assert plan(100) == (65, 7)
    assert plan(99.9) == (64, 7)
    assert plan(100, cap=50) == (50, 5)  # train.max_steps caps it
    assert plan(3) == (0, 0)  # not one step and its evaluation
    # every 4 steps too: step 40 costs 40 + 11 x 5 (4, 8, 10, 12, 16, 20, 24, 28, 30, 32, 36) + 5
    assert plan(100, eval_every=4) == (40, 12)
    # From step 7: checkpoints alone at 8, 12, 16, 24, ... (2 s) besides the epoch ends' evaluations
    assert plan(100, done=7, into=7, eval_s=0.0, save_s=2.0, save_every=4) == (77, 8)


def test_the_schedule_is_hugging_faces_linear_warmup_and_decay():
    import torch
    from transformers import get_linear_schedule_with_warmup

    from raytag.trainer.engine import LinearSchedule

    ours = LinearSchedule(7, 50)
    theirs = get_linear_schedule_with_warmup(torch.optim.SGD([torch.zeros(1)], lr=1.0), 7, 50).lr_lambdas[0]
    assert [ours(s) for s in range(60)] == [theirs(s) for s in range(60)]


def test_a_resume_that_trains_longer_takes_hugging_faces_rates_step_by_step():
    """A run stopped at step 2 of 2 and resumed to train 6 steps: the rate each step trains at is the
    one Hugging Face's schedule gave in the same resume (the optimizer's rate from the checkpoint for
    the first step, then the new plan). Setting the new plan's rate at once instead changed the
    first resumed step's rate (0 -> 0.5), a non-budgeted run's training, and broke test_elastic's
    0-sparse case."""
    from types import SimpleNamespace

    import torch
    from transformers import get_linear_schedule_with_warmup

    from raytag.trainer.engine import LinearSchedule, plan_schedule

    def rates(make, replan) -> list[float]:
        w = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([w], lr=1.0)
        sched, used = make(opt, 0, 2), []
        for _ in range(2):
            used.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        saved = {"opt": opt.state_dict(), "sched": sched.state_dict()}
        opt = torch.optim.SGD([w], lr=1.0)  # the resumed run: built for its plan, then loaded
        sched = make(opt, 1, 6)
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        replan(sched)
        for _ in range(4):
            used.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return used

    def ours(opt, warmup, total):
        return torch.optim.lr_scheduler.LambdaLR(opt, LinearSchedule(warmup, total))

    theirs = rates(get_linear_schedule_with_warmup, lambda sched: None)
    assert theirs == [1.0, 0.5, 0.0, 0.6, 0.4, 0.2]
    loop = rates(ours, lambda sched: plan_schedule(SimpleNamespace(lr_scheduler=sched), 1, 6, rate_now=False))
    assert loop == theirs
    # a budget's plan, made mid-run, sets the next step's rate at once
    now = rates(ours, lambda sched: plan_schedule(SimpleNamespace(lr_scheduler=sched), 1, 6))
    assert now == [1.0, 0.5, 0.8, 0.6, 0.4, 0.2]


def _timed_training(monkeypatch) -> dict[str, float]:
    """Times each call of the loop's `train_epochs` (the budget's span): {"seconds": last call's}."""
    import raytag.trainer.loop as loop

    real, took = loop.train_epochs, {}

    def timed(*args, **kwargs):
        began = time.monotonic()
        try:
            return real(*args, **kwargs)
        finally:
            took["seconds"] = time.monotonic() - began

    monkeypatch.setattr(loop, "train_epochs", timed)
    return took


def _learning_rates(run_dir) -> dict[int, float]:
    return {r["step"]: r["learning_rate"] for r in run_records(run_dir) if r["type"] == "train"}


def _assert_schedule_ends_at(rates: dict[int, float], plan: dict, peak: float, after: int) -> None:
    """The learning rates logged after step `after` follow the plan's decay, reaching 0 at its last step."""
    last, warmup = plan["planned_steps"], plan["warmup_steps"]
    assert max(rates) == last and rates[last] == 0.0, (last, rates.get(last))
    for step, lr in rates.items():
        if step > max(after, warmup):
            assert lr == pytest.approx(peak * (last - step) / (last - warmup), rel=1e-6, abs=1e-12), step


@pytest.mark.slow
def test_a_budgeted_run_ends_inside_its_budget_with_the_learning_rate_at_zero(tmp_path, monkeypatch):
    import raytag.trainer.session as session
    import raytag.trainer.step as step

    budget = 30.0
    took = _timed_training(monkeypatch)
    costs: dict[str, list[float]] = {"estimated": [], "evaluated": []}
    real_estimate, real_evaluate = step.time_evaluation, session.evaluate

    def estimate(*args):
        costs["estimated"].append(real_estimate(*args))
        return costs["estimated"][-1]

    def evaluate(*args):
        began = time.monotonic()
        try:
            return real_evaluate(*args)
        finally:
            costs["evaluated"].append(time.monotonic() - began)

    monkeypatch.setattr(step, "time_evaluation", estimate)
    monkeypatch.setattr(session, "evaluate", evaluate)
    # 600 sentences: the first steps are timed inside the first epoch, before its evaluation
    res = run(tmp_path, "budget", f"train.time_budget={budget:g}s", *SMALL, "data.max_train_samples=600")
    # One estimate: not below the evaluations' real cost (the plan must not overrun), and a small share
    # of the budget (a first pass pays a warm-up that later evaluations do not)
    (estimated,) = costs["estimated"]
    assert costs["evaluated"] and estimated > 0.5 * statistics.median(costs["evaluated"]), costs
    assert estimated < 0.05 * budget, costs

    tb = res["time_budget"]
    last, done = tb["planned_steps"], tb["planned_at_step"]
    assert res["global_steps"] == last and tb["steps"] == last
    assert 0 < done < last < 1000 * 42  # train.epochs=1000 did not bound it
    # planned again from the steps since: every quarter of the steps the last plan had left
    assert tb["replans"] >= 1, tb
    # Within the budget, give or take how much slower the steps ran than when they were timed (other
    # jobs on these cores slow some stretches of a run tenfold): a tolerance, not a benchmark.
    records = run_records(tmp_path / "budget")
    at = {r["step"]: r["time"] for r in records if r["type"] == "train"}
    pauses = {r["step"] for r in records if r["type"] == "eval"} | {done + 1}  # + the plan's checkpoint
    intervals = [at[k] - at[k - 1] for k in range(done + 2, last + 1) if k - 1 not in pauses]
    slowdown = max(1.0, sum(intervals) / len(intervals) / tb["seconds_per_step"])
    assert took["seconds"] <= budget * slowdown * 1.25 + 2, (took, slowdown, tb)
    assert took["seconds"] <= 3 * budget, (took, tb)  # train.epochs=100 would take minutes
    assert tb["seconds_used"] == pytest.approx(took["seconds"], abs=1.0)
    assert tb["seconds_left"] == pytest.approx(budget - tb["seconds_used"], abs=1e-3)
    # The last plan: its steps and evaluations fill the budget left when it was made (less the
    # reserve), and one more step does not fit.
    s, e, used = tb["seconds_per_step"], tb["seconds_per_evaluation"], tb["seconds_used_to_plan"]
    left = budget * (1 - RESERVE) - used  # (a first plan's would also keep its checkpoint's time)
    # results.json rounds the costs to 4 decimals (the seconds used to 3): with a thousand fast steps
    # that is worth more than 0.01 s
    slack = 0.01 + 5e-5 * (last + 1 - done + tb["planned_evaluations"] + 1) + 5e-4
    assert (last - done) * s + tb["planned_evaluations"] * e <= left + slack
    assert (last + 1 - done) * s + tb["planned_evaluations"] * e > left - slack
    evals = [r["step"] for r in records if r["type"] == "eval"]
    assert len([x for x in evals if x > done]) == tb["planned_evaluations"] and evals[-1] == last
    # The plan estimated an evaluation from a sample: the only ones run are at epoch ends and the end.
    assert all(r["epoch"] == int(r["epoch"]) or r["step"] == last for r in records if r["type"] == "eval")
    # The schedule was planned to end there: the learning rate is 0 at the last step.
    _assert_schedule_ends_at(_learning_rates(tmp_path / "budget"), tb, 3e-3, after=done)


@pytest.mark.slow
def test_a_resumed_budgeted_run_keeps_its_plan_and_its_budget_left(tmp_path, monkeypatch):
    import raytag.trainer.step as step
    from raytag.trainer.budget import Budget

    plans: list[dict] = []
    real_decide = Budget.decide

    def decide(self, *args, **kwargs):
        total = real_decide(self, *args, **kwargs)
        plans.append(dict(self.state))
        return total

    monkeypatch.setattr(Budget, "decide", decide)
    # Killed half-way between a plan and its last step (one micro-batch a step: the n-th is step n's):
    # the first plan with steps enough ahead (on a busy machine the first may have next to none).
    real_collate, calls = step.collate, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        ahead = [p for p in plans if p["planned_steps"] - p["planned_at_step"] >= 4]
        if ahead and "killed" not in calls:
            # (a later plan may end sooner than the first thought: then one step before its end)
            at = min(
                (ahead[0]["planned_at_step"] + ahead[0]["planned_steps"]) // 2, plans[-1]["planned_steps"] - 2
            )
            if calls["n"] == at + 1:
                calls["killed"] = at
                raise KeyboardInterrupt("killed")
        return real_collate(*args, **kwargs)

    monkeypatch.setattr(step, "collate", dying)
    common = ["train.time_budget=15s", *SMALL]
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "resumed", *common)
    monkeypatch.setattr(step, "collate", real_collate)
    latest = sorted((tmp_path / "resumed" / "checkpoints").iterdir())[-1]
    kept = json.loads((latest / "progress.json").read_text())
    resumed_at, made = kept["global_step"], len(plans)
    # The checkpoint keeps the last plan made before it.
    (last_before,) = [p for p in plans if p["planned_at_step"] <= resumed_at][-1:]
    assert {k: kept["time_budget"][k] for k in last_before if k != "seconds_used"} == {
        k: v for k, v in last_before.items() if k != "seconds_used"
    }

    took = _timed_training(monkeypatch)
    res = run(tmp_path, "resumed", *common)
    assert res["resumed_from"] == latest.name
    # Not timed and planned from scratch: only planned again, from the kept plan, after steps of its own.
    again = plans[made:]
    assert all(
        p["replans"] > kept["time_budget"]["replans"] and p["planned_at_step"] > resumed_at for p in again
    )
    evals = [r for r in run_records(tmp_path / "resumed") if r["type"] == "eval" and r["step"] > resumed_at]
    # no timing evaluation: only epoch ends and the last step
    assert all(r["epoch"] == int(r["epoch"]) or r["step"] == res["global_steps"] for r in evals), evals
    tb = res["time_budget"]
    final = again[-1] if again else kept["time_budget"]
    assert {k: tb[k] for k in final if k not in ("seconds_used", "steps", "seconds_left")} == {
        k: v for k, v in final.items() if k not in ("seconds_used", "steps", "seconds_left")
    }
    assert res["global_steps"] == tb["planned_steps"]
    # The budget goes on from the checkpoint's: the seconds it had used, then this attempt's.
    assert tb["seconds_used"] == pytest.approx(kept["time_budget"]["seconds_used"] + took["seconds"], abs=1.0)
    # The kept schedule until this attempt plans again, then the last plan's, ending at 0.
    rates = _learning_rates(tmp_path / "resumed")
    until = again[0]["planned_at_step"] if again else tb["planned_steps"]
    plan = kept["time_budget"]
    for k in range(max(resumed_at, plan["warmup_steps"]) + 1, until + 1):
        expected = 3e-3 * (plan["planned_steps"] - k) / (plan["planned_steps"] - plan["warmup_steps"])
        assert rates[k] == pytest.approx(expected, rel=1e-6, abs=1e-12), k
    _assert_schedule_ends_at(rates, tb, 3e-3, after=tb["planned_at_step"])


@pytest.mark.slow
def test_a_budget_too_small_for_one_step_is_a_one_line_error(tmp_path):
    r = cli(
        "--config",
        str(DEMO),
        f"run.storage={tmp_path}",
        "run.name=tiny",
        "data.max_train_samples=32",
        "data.max_eval_samples=16",
        "train.time_budget=0.001",
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("raytag: error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "train.time_budget 0.001 is too small for this run" in errors[0], errors
    assert not (tmp_path / "tiny" / "results.json").exists()
