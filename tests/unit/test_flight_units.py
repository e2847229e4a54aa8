"""The flight recorder's pure parts: summaries added across folds, the hang rule, and the
exit that keeps a window."""

from renacerd.serve.flight import FlightPolicy, FlightRun, exit_reason
from renacerd.store.flight import merge_summary

MS = 1_000_000


def test_summaries_of_two_folds_add_up():
    a = {"events": 5, "threads": 2, "files": {"/a": {"bytes_read": 10, "created": False}},
         "syscalls": {"read": {"calls": 2, "total_ns": 5}}, "gpu": None}
    b = {"events": 7, "threads": 3, "files": {"/a": {"bytes_read": 1, "created": True},
                                              "/b": {"bytes_read": 4, "created": False}},
         "syscalls": {"read": {"calls": 1, "total_ns": 1}, "stat": {"calls": 9,
                                                                   "total_ns": 90}},
         "gpu": {"launches": 1}, "stopped_following": "privilege gained at exec"}
    m = merge_summary(a, b)
    assert m["events"] == 12
    assert m["threads"] == 3  # the larger: threads seen in both folds are one set
    assert m["files"] == {"/a": {"bytes_read": 11, "created": True},
                          "/b": {"bytes_read": 4, "created": False}}
    assert list(m["syscalls"]) == ["stat", "read"]  # biggest total time first, as strace -c
    assert m["syscalls"]["read"] == {"calls": 3, "total_ns": 6}
    assert m["gpu"] == {"launches": 1} and m["stopped_following"] == "privilege gained at exec"
    assert merge_summary(None, a) is a and merge_summary(a, None) is a


def test_a_step_is_hung_once_over_the_factor_of_the_median():
    fr = FlightRun(FlightPolicy(10**9, hang_factor=4), run_id=1)
    assert fr.hang([10 * MS, 10 * MS], [(3, 0)], 10**9) is None  # too few steps to judge
    steps = [10 * MS, 12 * MS, 8 * MS]
    assert fr.hang(steps, [(3, 0)], 40 * MS) is None  # 40 ms: exactly 4 x, not over
    why = fr.hang(steps, [(3, 0)], 41 * MS)
    assert why == "hang: step 3 open 0.04 s, over 4 x the median step (0.010 s)"
    assert fr.hang(steps, [(3, 0)], 90 * MS) is None  # said once


def test_keeping_a_window_stops_the_fold_at_its_start():
    class Store:
        def __init__(self):
            self.kept = []

        def keep_window(self, run_id, reason, lo, hi):
            self.kept.append((run_id, reason, lo, hi))

    st, fr = Store(), FlightRun(FlightPolicy(2 * 10**9), run_id=7)
    assert fr.cutoff(10 * 10**9) == 8 * 10**9
    assert fr.keep(st, "dump by uid 0", 5 * 10**9) == (3 * 10**9, 5 * 10**9)
    assert st.kept == [(7, "dump by uid 0", 3 * 10**9, 5 * 10**9)]
    assert fr.cutoff(10 * 10**9) == 3 * 10**9  # from the kept window on, nothing is folded


def test_which_endings_keep_the_window():
    assert exit_reason(0, None) is None
    assert exit_reason(3, None) == "exit code 3"
    assert exit_reason(None, 9) == "killed by signal 9"
