"""The progress line: counts, epochs of the whole run and an ETA from measured epoch times."""

from __future__ import annotations

from poh_tune.progress import TrialProgress, progress_line, seconds_per_epoch


def tp(tid, status, done, its, last_s, epochs=10, seconds=0.0, metric=None):
    return TrialProgress(tid, status, epochs, done, seconds, its, last_s, metric)


def test_counts_epochs_and_eta():
    trials = [tp("a", "TERMINATED", 10, 10, 2.0, metric=0.5),
              tp("b", "TERMINATED", 4, 4, 2.0, metric=0.7),  # stopped early by ASHA
              tp("c", "RUNNING", 3, 3, 4.0, metric=0.6),
              tp("d", "PENDING", 0, 0, 0.0)]
    line = progress_line(trials, total_trials=6, epochs=10, elapsed=3725, exp_dir="/runs/x",
                         slots=2)
    # 2 ended, 1 running, 1 pending + 2 not created yet.
    assert line.startswith("[1:02:05] trials 2 done, 1 running, 3 waiting (of 6) | ")
    # b needs no more epochs than it did: 10 + 4 + 10 + 10 + 2 * 10.
    assert "| epochs 17/54 |" in line
    # 37 epochs left at (2 + 2 + 4) / 3 s each, two trials at a time: 49.3 s.
    assert "| 2.667 s/epoch | ETA 0:00:49 |" in line  # 4 significant digits
    assert "| best tau 0.7 (b) |" in line and line.endswith("| /runs/x")
    assert "ETA <= 0:00:49" in progress_line(trials, 6, 10, 0, "/runs/x", asha=True, slots=2)
    assert "best tau 0.5 (a)" in progress_line(trials, 6, 10, 0, "/runs/x", mode="min")


def test_first_epochs_and_the_end():
    assert "ETA after the first epoch" in progress_line(
        [tp("a", "RUNNING", 0, 0, 0.0)], 2, 10, 5, "/r")
    # Only first epochs so far: their start-up is all there is to measure.
    first = [tp("a", "RUNNING", 1, 1, 9.0, seconds=9.0), tp("b", "RUNNING", 1, 1, 5.0, seconds=5.0)]
    assert seconds_per_epoch(first) == 7.0
    assert seconds_per_epoch(first + [tp("c", "RUNNING", 2, 2, 1.0, seconds=8.0)]) == 1.0
    end = progress_line([tp("a", "TERMINATED", 10, 10, 1.0), tp("b", "ERROR", 2, 2, 1.0)],
                        2, 10, 60, "/r")
    assert "trials 2 done (1 errored), 0 running, 0 waiting (of 2) | epochs 12/12 |" in end
    assert "ETA 0:00:00" in end
