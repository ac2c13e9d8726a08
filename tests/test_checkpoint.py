"""Checkpoints: atomic, verified, and safe to copy while their owner keeps saving."""

from __future__ import annotations

import threading

import pytest
import torch

from kubetune.trial import checkpoint


@pytest.fixture
def in_experiment(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBETUNE_CHECKPOINT_DIR", str(tmp_path))
    monkeypatch.setenv("KUBETUNE_EXPERIMENT", "exp")
    monkeypatch.setattr(checkpoint, "_saved_here", False)  # (each test a trial process of its own)
    monkeypatch.setattr(checkpoint, "_held_step", None)

    def as_trial(number):
        monkeypatch.setenv("KUBETUNE_TRIAL_NAME", checkpoint.donor_name(number))
    return as_trial


def test_save_and_load_round_trip(in_experiment):
    in_experiment(0)
    assert checkpoint.load() is None
    checkpoint.save({"w": 1.5}, step=3)
    checkpoint.save({"w": 2.5}, step=4)
    assert checkpoint.load() == {"w": 2.5}
    assert checkpoint.load_bytes()[1]["step"] == 4


def test_a_corrupted_checkpoint_is_refused(in_experiment):
    in_experiment(0)
    path = checkpoint.save({"w": 1.0}, step=1)
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    with pytest.raises(checkpoint.CheckpointError, match="does not match its digest"):
        checkpoint.load()


def test_copying_a_donor_that_keeps_saving_always_gets_a_whole_checkpoint(in_experiment):
    in_experiment(1)
    checkpoint.save({"step": 0, "blob": bytes([0]) * 100_000}, step=0)
    done = threading.Event()

    def donor_trains():
        step = 1
        while not done.is_set():
            checkpoint.save({"step": step, "blob": bytes([step % 256]) * 100_000}, step=step)
            step += 1

    writer = threading.Thread(target=donor_trains)
    writer.start()
    try:
        # Another trial reads the donor's checkpoint, many times, while the donor writes.
        copies = []
        for _ in range(200):
            state = checkpoint.load(checkpoint.donor_name(1))
            assert state["blob"] == bytes([state["step"] % 256]) * 100_000
            copies.append(state["step"])
    finally:
        done.set()
        writer.join()
    assert copies == sorted(copies)  # never an older checkpoint after a newer one


def test_copy_from_a_donor_without_checkpoint_says_so(in_experiment):
    in_experiment(2)
    with pytest.raises(checkpoint.CheckpointError, match="has no checkpoint to copy"):
        checkpoint.copy_from(checkpoint.donor_name(7))


def test_an_exploit_takes_the_donors_checkpoint_from_the_step_it_was_judged_at(in_experiment):
    from kubetune.api.trial import Decision

    in_experiment(1)
    for step in range(1, 6):  # the donor went on training after the decision at step 4
        checkpoint.save({"w": step}, step=step)
    in_experiment(2)
    meta = checkpoint.copy_from(Decision("exploit", donor=1, donor_step=4))
    assert meta["step"] == 4 and checkpoint.load() == {"w": 4}
    assert checkpoint.load_bytes()[1]["step"] == 4  # now this trial's latest
    # Older than every checkpoint the donor still keeps (the last 3): the nearest one it has.
    checkpoint.copy_from(Decision("exploit", donor=1, donor_step=1))
    assert checkpoint.load() == {"w": 3}
    # By name only (an older scheduler's decision has no step): the donor's latest.
    checkpoint.copy_from(checkpoint.donor_name(1))
    assert checkpoint.load() == {"w": 5}


# The trial image's trainers run on the GPU when there is one: there the weights and the
# optimizer's state must come back on the model's device. CI has no GPU, so it checks the CPU.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_pytorch_exploit_takes_the_donors_model_and_optimizer_at_the_judged_step(in_experiment, device):
    from kubetune.api.trial import Decision
    from kubetune.trial import pytorch as ckpt

    def net(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(4, 2).to(device)
        return model, torch.optim.Adam(model.parameters(), lr=0.01)

    def train_step(model, opt):
        opt.zero_grad()
        model(torch.ones(3, 4, device=device)).pow(2).sum().backward()
        opt.step()

    in_experiment(1)
    donor, donor_opt = net(1)
    kept = {}
    for step in (1, 2, 3):  # the donor trains on after the step it is judged at (2)
        train_step(donor, donor_opt)
        ckpt.save(donor, donor_opt, step=step)
        kept[step] = ({k: v.clone() for k, v in donor.state_dict().items()},
                      donor_opt.state_dict()["state"][0]["exp_avg"].clone())

    in_experiment(2)
    taker, taker_opt = net(2)
    train_step(taker, taker_opt)
    ckpt.save(taker, taker_opt, step=1)
    assert ckpt.restore(taker, taker_opt, donor=Decision("exploit", donor=1, donor_step=2),
                        map_location=device) == 2
    weights, exp_avg = kept[2]
    for k, v in taker.state_dict().items():
        assert v.device.type == device and torch.equal(v, weights[k])
    state = taker_opt.state_dict()["state"][0]
    assert state["exp_avg"].device.type == device and torch.equal(state["exp_avg"], exp_avg)
    train_step(taker, taker_opt)  # and it trains on from there on the same device

    # Started again after a pause: its own latest checkpoint (now the donor's step-2 copy).
    again, again_opt = net(3)
    assert ckpt.restore(again, again_opt, map_location=device) == 2
    assert all(torch.equal(v, weights[k]) for k, v in again.state_dict().items())


def test_a_new_attempt_runs_from_the_start_not_from_the_lost_attempts_checkpoint(in_experiment, monkeypatch):
    """A trial whose pod was lost runs again as attempt 2 with a fresh record: resuming the lost run's
    model would report only the steps after its checkpoint. A resumed pause (same attempt) still resumes."""
    in_experiment(0)
    checkpoint.save({"epoch": 3}, step=3)
    assert checkpoint.load() == {"epoch": 3}  # the same attempt: a paused trial resumed takes it
    monkeypatch.setenv("KUBETUNE_ATTEMPT", "2")
    assert checkpoint.load() is None
    checkpoint.save({"epoch": 1}, step=1)
    assert checkpoint.load() == {"epoch": 1}
    assert [m["step"] for m in checkpoint._read_latest(checkpoint.trial_folder())["recent"]] == [1]
    in_experiment(1)  # another trial, exploiting trial 0, takes its current checkpoint whatever its attempt
    assert checkpoint.copy_from(checkpoint.donor_name(0))["step"] == 1


def test_a_resumed_run_starts_from_the_checkpoint_of_the_step_its_trial_was_paused_at(in_experiment, monkeypatch):
    """A trainer that ignores a pause at step 1 trains and saves 6 steps more before it exits. The
    checkpoint of step 1 must outlive those saves, and the resumed run (KUBETUNE_RESUME_STEP) must get it,
    not the latest: its record ends at step 1."""
    in_experiment(0)
    checkpoint.save({"step": 1}, step=1)
    checkpoint.hold(1)  # what report() does with a pause
    for step in range(2, 8):
        checkpoint.save({"step": step}, step=step)
    assert len(list(checkpoint.trial_folder().glob("checkpoint-*.bin"))) == checkpoint.KEEP + 1
    # The resumed run: a new process.
    monkeypatch.setattr(checkpoint, "_saved_here", False)
    monkeypatch.setattr(checkpoint, "_held_step", None)
    monkeypatch.setenv("KUBETUNE_RESUME_STEP", "1")
    assert checkpoint.load() == {"step": 1}
    checkpoint.save({"step": 2}, step=2)
    assert checkpoint.load() == {"step": 2}, "once it saves, its own latest"


def test_a_resumed_run_whose_checkpoints_count_steps_otherwise_than_its_reports_gets_its_latest(
        in_experiment, monkeypatch):
    """Reports by epoch (the scheduler's resource), checkpoints by global step, as many trainers name them.
    Paused at epoch 3, the trainer saves global step 3000 and exits as told. The resumed run got the oldest
    checkpoint kept (global step 1000: none was saved at or before "step 3"), and trained epochs 2 and 3
    again, where it got its latest before resumes knew their step."""
    in_experiment(0)
    for epoch in (1, 2, 3):
        checkpoint.save({"global_step": 1000 * epoch}, step=1000 * epoch)
    checkpoint.hold(3)  # report(3, ...) answered pause
    monkeypatch.setattr(checkpoint, "_saved_here", False)  # the resumed run: a new process
    monkeypatch.setattr(checkpoint, "_held_step", None)
    monkeypatch.setenv("KUBETUNE_RESUME_STEP", "3")
    assert checkpoint.load() == {"global_step": 3000}
