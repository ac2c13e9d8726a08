"""Checkpoints: atomic, verified, and safe to copy while their owner keeps saving."""

from __future__ import annotations

import threading

import pytest

from kubetune.trial import checkpoint


@pytest.fixture
def in_experiment(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBETUNE_CHECKPOINT_DIR", str(tmp_path))
    monkeypatch.setenv("KUBETUNE_EXPERIMENT", "exp")

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
