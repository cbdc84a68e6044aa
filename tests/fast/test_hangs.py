"""The hang report from the ranks' dumps (dtrain.core.hangs): which rank never arrived, and where it was."""

from __future__ import annotations

import json

from dtrain.core.hangs import behind, hang_report, live_ranks, read_states, stacks_header, timed_out


def state(rank, step, collectives, frame=("/r/train.py", 12, "main"), when=100.0):
    return {"rank": rank, "step": step, "time": when, "user_frame": frame and list(frame), "collectives": collectives}


def test_the_rank_that_entered_fewer_collectives_is_the_one_that_never_arrived():
    states = [state(0, 20, {"default_pg": [30, "gloo:all_reduce"], "shared-memory gradient all-reduce": [21, "x"]}),
              state(1, 20, {"default_pg": [29, "gloo:barrier"], "shared-memory gradient all-reduce": [21, "x"]},
                    frame=("/r/train.py", 40, "after_step")),
              state(2, 20, {"default_pg": [30, "gloo:all_reduce"], "shared-memory gradient all-reduce": [20, "x"]})]
    assert behind(states) == {1: "gloo:all_reduce #30 of default_pg (its last: #29)",
                              2: "x #21 of shared-memory gradient all-reduce (its last: #20)"}
    lines = hang_report(states, "/r/runs/a")
    assert lines[:2] == [  # the verdict first
        "dtrain: rank 1 hung: it never reached the collective the others waited in; at step 20 it was at "
        "/r/train.py:40 in after_step.",
        "dtrain: rank 2 hung: it never reached the collective the others waited in; at step 20 it was at "
        "/r/train.py:12 in main."]
    assert lines[2].startswith("dtrain: where each rank was when the collective timed out")
    assert lines[3].startswith("  rank 0: step 20, waiting for the others, at ")
    assert lines[4] == ("  rank 1: step 20, never reached gloo:all_reduce #30 of default_pg (its last: #29), at "
                        "/r/train.py:40 in after_step")


def test_ranks_level_with_each_other_are_listed_and_no_one_is_blamed():
    states = [state(r, 7, {"default_pg": [3, "gloo:broadcast"]}, frame=None) for r in (0, 1)]
    assert behind(states) == {}
    assert hang_report(states, "runs/a")[1:] == ["  rank 0: step 7, waiting for the others, at no frame of the "
                                                 "recipe's own code",
                                                 "  rank 1: step 7, waiting for the others, at no frame of the "
                                                 "recipe's own code"]
    assert hang_report([], "runs/a") == []


def test_only_this_launchs_dumps_are_read_and_ranks_announce_their_process(tmp_path):
    debug = tmp_path / "debug"
    debug.mkdir()
    (debug / "rank0.json").write_text(json.dumps(state(0, 5, {}, when=50.0)))  # an earlier launch's
    (debug / "rank1.json").write_text(json.dumps(state(1, 5, {}, when=150.0)))
    (debug / "rank2.json").write_text("{")  # cut short
    assert [s["rank"] for s in read_states(tmp_path, since=100.0)] == [1]
    (debug / "rank1-stacks.txt").write_text(stacks_header(1, 4242, "node-b") + "--- step 3\n")
    assert live_ranks(tmp_path) == [(1, 4242, "node-b")]


def test_time_outs_in_the_words_of_gloo_nccl_and_dtrain():
    assert timed_out("RuntimeError: [../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 20000ms for recv")
    assert timed_out("Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5, OpType=ALLREDUCE) ran for "
                     "600010 milliseconds before timing out. ... collective timed out")
    assert timed_out("RuntimeError: Timed out waiting 30000ms for the other ranks in shared-memory gradient all-reduce 4")
    assert not timed_out("RuntimeError: Connection closed by peer [198.18.0.2]:20142")


def test_the_node_blamed_is_where_a_rank_hung_or_hit_a_device_error_and_a_recipes_bug_blames_none():
    from dtrain.core.contract import RankFailure
    from dtrain.core.hangs import culprit_nodes

    hung = [state(0, 20, {"default_pg": [30, "gloo:all_reduce"]}), state(1, 20, {"default_pg": [29, "gloo:barrier"]}),
            state(2, 20, {"default_pg": [30, "gloo:all_reduce"]})]
    nodes = ["n1", "n2", "n3"]
    assert culprit_nodes(hung, nodes, []) == {"n2": "rank 1 never reached gloo:all_reduce #30 of default_pg (its "
                                                    "last: #29)"}
    level = [state(r, 20, {"default_pg": [30, "gloo:all_reduce"]}) for r in range(3)]  # every rank in the recipe
    bug = [RankFailure(rank, "ValueError: rank exploded", 1.0, 0, False) for rank in range(3)]
    assert culprit_nodes(level, nodes, bug) == {}
    device = [RankFailure(2, "RuntimeError: CUDA error: uncorrectable ECC error encountered\nmore", 1.0, 0, False)]
    assert culprit_nodes(level, nodes, device) == {
        "n3": "rank 2 hit a device error (RuntimeError: CUDA error: uncorrectable ECC error encountered)"}
