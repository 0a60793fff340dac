"""The worker's named steps (:class:`hrt_ray.train.loop.WorkerState`), each on its own, on the CPU.

No Ray: the steps that only touch torch state (set-up, resume, one pass without a report due,
the report decision, the progress metrics, the finite-state check, the checkpoint's content) run
here in the test process on a real ``hrt_tiny_ocr``; the steps that call Ray (report, validation)
run in the Ray tests (test_train_ray.py and others).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hrt_ray.config import ExperimentConfig, load_config, to_dict
from hrt_ray.train import loop
from hrt_ray.train.loop import NonFiniteLossError, NonFiniteStateError, WorkerState
from hrt_ray.train.state import load_state, rng_state, save_state

CPU = torch.device("cpu")
SIZE = 32


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    """Set-up sets the worker's torch threads (``scaling.cpus_per_worker``); give the box back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny(*overrides: str) -> ExperimentConfig:
    return load_config(
        None,
        [
            f"data.crop_size=[{SIZE},{SIZE}]",
            "model.num_classes=5",  # not read from a dataset spec or manifest another test left
            "optim.max_iters=6",
            "optim.warmup_iters=1",
            "loss.ohem_min_kept=100",
            "checkpoint.every=100",
            "eval.interval=100",
            "failure.checkpoint_on_preemption=false",
            *overrides,
        ],
    )


def worker(cfg: ExperimentConfig, rank: int = 0, world: int = 1) -> WorkerState:
    w = WorkerState.set_up(cfg, to_dict(cfg), rank, world, CPU)
    w.distribute()
    return w


def batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randn(2, 3, SIZE, SIZE, generator=gen),
            "mask": torch.randint(0, 5, (2, SIZE, SIZE), generator=gen),
        }
        for _ in range(n)
    ]


def test_one_pass_trains_on_every_batch_and_meters_it() -> None:
    w = worker(tiny())
    assert (w.iteration, w.data_epoch, w.resumed_from, w.last_checkpoint) == (0, 0, None, None)
    assert w.train_model is w.model and w.model.training  # one worker: no DDP wrapper
    before = {n: p.detach().clone() for n, p in w.model.named_parameters()}
    assert w.one_pass(batches(2)) == 2
    assert w.iteration == 2 and w.scheduler.last_epoch == 2
    assert w.meter.steps == 2 and w.meter.images == 4 and w.meter.skipped == 0
    assert math.isfinite(w.meter.loss_sum) and w.meter.loss_sum > 0
    assert w.meter.busy_s > 0 and w.meter.wait_s >= 0
    assert any(not torch.equal(before[n], p) for n, p in w.model.named_parameters()), "weights moved"
    assert w.one_pass(batches(3, seed=1)) == 3 and w.iteration == 5
    assert w.one_pass([]) == 0 and w.iteration == 5  # the loop turns an empty pass into an error


def test_the_loop_calls_train_step_through_its_module_globals(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests inject faults by replacing ``loop.train_step`` in the worker (tests/faults.py)."""
    seen: list[int] = []
    real = loop.train_step

    def recording(*args: object, **kwargs: object) -> loop.StepResult:
        seen.append(args[3].last_epoch + 1)  # the scheduler: the iteration about to run
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", recording)
    w = worker(tiny())
    w.one_pass(batches(2))
    assert seen == [1, 2]


def test_reports_fall_due_at_the_same_iterations_on_every_rank() -> None:
    w = worker(tiny("optim.max_iters=7", "checkpoint.every=2", "eval.interval=3"))
    due = {}
    for it in range(1, 8):
        w.iteration = it
        due[it] = w.due()
    assert due == {
        1: (False, False),
        2: (False, True),
        3: (True, True),
        4: (False, True),
        5: (False, False),
        6: (True, True),
        7: (True, True),  # the last iteration always validates and checkpoints
    }


@pytest.mark.parametrize("mode", ["max", "min"])
def test_progress_metrics_keep_the_best_value_of_the_checkpoint_metric(mode: str) -> None:
    w = worker(tiny(f"checkpoint.mode={mode}", "checkpoint.metric=train/loss"))
    w.iteration, w.data_epoch = 4, 1
    first = w.with_progress({"perf/step_time_s": 0.5})
    assert first == {"perf/step_time_s": 0.5, "iteration": 4, "data_epoch": 1}, "no sentinel best"
    assert w.with_progress({"train/loss": 0.5})["best"] == 0.5
    assert w.with_progress({"train/loss": 0.3})["best"] == (0.5 if mode == "max" else 0.3)
    assert w.with_progress({"train/loss": 0.9})["best"] == (0.9 if mode == "max" else 0.3)
    assert w.with_progress({"perf/step_time_s": 0.4})["best"] == w.best, "a report without it keeps it"


def test_check_finite_names_the_broken_tensor_and_the_last_checkpoint() -> None:
    w = worker(tiny())
    w.one_pass(batches(1))
    w.check_finite()  # a healthy state passes
    w.iteration, w.last_checkpoint = 3, 2
    name, param = next(iter(w.model.named_parameters()))
    with torch.no_grad():
        param.view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteStateError) as info:
        w.check_finite()
    message = str(info.value)
    assert f"after iteration 3 (model.{name} on rank 0)" in message
    assert "the last checkpoint (reported; the run resumes from it) is at iteration 2" in message
    assert "optim.lr" in message


def test_a_non_finite_loss_names_what_was_saved() -> None:
    w = worker(tiny("loss.ohem=false"))
    poisoned = batches(1)[0]
    poisoned["image"] = poisoned["image"] * float("nan")
    with pytest.raises(NonFiniteLossError) as info:
        w.one_pass([poisoned])
    assert str(info.value).startswith(
        "non-finite loss (nan) at iteration 1; this step was not applied; nothing after iteration 0 "
        "was saved, this run has no checkpoint yet. Lower optim.lr"
    )
    assert w.iteration == 0 and w.meter.steps == 0 and w.scheduler.last_epoch == 0


def test_a_checkpoint_resumes_into_a_fresh_worker(tmp_path: Path) -> None:
    cfg = tiny()
    first = worker(cfg)
    first.one_pass(batches(2))
    first.best, first.history = 0.4, [[2.0, 0.4]]
    save_state(tmp_path, first.checkpoint_state([rng_state()]))
    after_save = torch.rand(3)

    saved = load_state(tmp_path)  # as a restarted worker reads it: from disk, weights_only
    assert saved["config"] == to_dict(cfg) and saved["arch"] == "hrt_tiny_ocr" and saved["num_classes"] == 5
    second = WorkerState.set_up(cfg, to_dict(cfg), 0, 1, CPU)
    second.resume(saved)
    assert torch.equal(torch.rand(3), after_save), "the RNG streams continue where they were saved"
    second.distribute()
    assert (second.iteration, second.resumed_from, second.last_checkpoint) == (2, 2, 2)
    assert second.data_epoch == 1, "the partly seen epoch is not replayed"
    assert second.best == 0.4 and second.history == [[2.0, 0.4]]
    assert second.scheduler.last_epoch == 2 and second.optimizer.state_dict()["state"]
    restored = second.model.state_dict()
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, restored[name]), name
    assert second.one_pass(batches(1, seed=2)) == 1 and second.iteration == 3


def test_a_resume_at_another_world_size_draws_fresh_distinct_streams(tmp_path: Path) -> None:
    cfg = tiny()
    first = worker(cfg)
    first.one_pass(batches(1))
    state = first.checkpoint_state([rng_state(), rng_state()])  # saved by two workers
    second = WorkerState.set_up(cfg, to_dict(cfg), 0, 1, CPU)  # resumed by one
    second.resume(state)
    assert torch.initial_seed() == cfg.seed * 1000 + 0 + 7919 * 1


def test_a_run_without_a_checkpoint_starts_afresh() -> None:
    w = WorkerState.set_up(tiny(), {}, 0, 1, CPU)
    w.resume(None)
    assert (w.iteration, w.data_epoch, w.best, w.history, w.resumed_from, w.last_checkpoint) == (
        0, 0, None, [], None, None,
    )  # fmt: skip
    assert w.result() == {"iteration": 0, "best": None, "history": [], "resumed_from": None}


def test_production_code_carries_no_fault_hooks() -> None:
    """Faults come from outside (tests/faults.py), not from knobs in the training API."""
    from hrt_ray.train.trainer import _fit, build_trainer, fit

    for fn in (fit, _fit, build_trainer):
        assert "fault" not in inspect.signature(fn).parameters, fn.__name__
    assert "poison_loss" not in inspect.signature(loop.train_step).parameters
    source = inspect.getsource(loop)
    for hook in ("os._exit", '"fault"', "crash_at_iter", "nan_at_iter", "poison_loss"):
        assert hook not in source, hook
    assert len(inspect.getsource(loop.train_loop_per_worker).splitlines()) <= 80
