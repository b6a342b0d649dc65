"""The reliability proof must be able to fail: break each guarantee on purpose, see a test catch it.

Each :class:`Mutation` is one deliberate bug: a line of product code replaced by a wrong one. For
each, its ``catchers`` (pytest node ids: unit and process tests, and the chaos scenario that names
the behaviour) must *fail* on a copy of the tree carrying that bug. A mutation whose catchers all
pass is a **survivor**: the suite would let that bug ship. docs/RELIABILITY.md lists the same table.

``python -m ndpipe.chaos.mutations`` (from a clone) copies the tracked files to a temp dir per
mutation, applies the one change, and runs each catcher there with the copy first on the import
path (child processes inherit it), so the installed package is never touched. A catcher is
*caught* when its test run fails; it *missed* when it passes. Exit status 1 on any survivor or miss.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Package folder -> import name, as pyproject.toml's package-dir maps them.
PACKAGES = {"core": "ndpipe", "broker": "ndpipe/broker", "worker": "ndpipe/worker", "master": "ndpipe/master",
            "examples": "ndpipe/examples", "bench": "ndpipe/bench", "chaos": "ndpipe/chaos"}

STATE, MSTATE, DAEMON, CODEC = "broker/state.py", "master/state.py", "worker/daemon.py", "core/codec.py"
LANE = "worker/lane.py"
T_STATE, T_FAIL, T_MASTER = "tests/test_broker_state.py", "tests/test_failures.py", "tests/test_master.py"
T_MSTATE = "tests/test_master_state.py"
T_STAGES = "tests/test_stages.py"
T_ITER = "tests/test_iterate.py"
CHAOS = "tests/test_chaos.py::test_scenario_passes_the_checker"
SECURITY, T_SEC = "core/security.py", "tests/test_security.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    guarantee: str  # what the product promises, in the user's words
    bug: str  # what the mutation does
    path: str  # file in the repo
    old: str  # exact text, found exactly once
    new: str
    catchers: tuple[str, ...]  # pytest node ids that must fail with the bug in place

    def apply(self, root: Path) -> None:
        target = root / self.path
        text = target.read_text()
        if text.count(self.old) != 1:
            raise ValueError(f"mutation {self.name}: the text to replace occurs {text.count(self.old)} times in "
                             f"{self.path} (must be once): update the catalog after a refactor")
        target.write_text(text.replace(self.old, self.new))


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "expired-worker-keeps-tasks", "A worker that falls silent (frozen, cut off) has its tasks run elsewhere",
        "the broker forgets an expired worker without requeueing its tasks", STATE,
        "        for wid in dead:\n            self.worker_gone(wid, now)\n",
        "        for wid in dead:\n            for lane in self.hosts[wid].lanes.values():\n"
        "                lane.inflight.clear()\n            self.worker_gone(wid, now)\n",
        (f"{T_STATE}::test_dead_worker_tasks_go_back_to_the_head_with_attempt_plus_one",
         f"{T_FAIL}::test_frozen_worker_tasks_finish_before_it_resumes", f"{CHAOS}[worker_frozen]")),
    Mutation(
        "crash-not-retried", "A task whose compute process died runs again",
        "a CRASHED report settles the task instead of requeueing it", STATE,
        '            self._requeue(task, True, why or "compute process died while running the task")\n',
        "            self._finish(task)\n",
        (f"{T_STATE}::test_poison_task_fails_after_max_attempts",
         f"{T_FAIL}::test_compute_process_killed_mid_task_runs_elsewhere", f"{CHAOS}[workers_killed]")),
    Mutation(
        "child-death-unreported", "A task that kills its lane every time fails after max_attempts",
        "the worker daemon replaces a dead lane without reporting the task it was running (LANE_GONE alone "
        "hands it back uncounted: it would run forever)", DAEMON,
        '        if view.state == RUNNING and lane.killed != "cancel":\n',
        "        if False:\n",
        (f"{T_FAIL}::test_crashing_handler_fails_after_max_attempts", f"{CHAOS}[worker_oom]")),
    Mutation(
        "attempts-unbounded", "A task that kills its process every time fails after max_attempts",
        "the broker retries a crashing task forever", STATE,
        "        elif task.attempt >= task.max_attempts:\n", "        elif False:\n",
        (f"{T_STATE}::test_poison_task_fails_after_max_attempts",
         f"{T_FAIL}::test_crashing_handler_fails_after_max_attempts", f"{CHAOS}[worker_oom]")),
    Mutation(
        "duplicate-submit-queued", "A task resent under its id runs once (no duplicate work, no second answer)",
        "the broker queues a SUBMIT whose task id it already holds", STATE,
        "        if tid in self.tasks:\n            self.counters[\"duplicates\"] += 1\n",
        "        if tid in self.tasks and False:\n            self.counters[\"duplicates\"] += 1\n",
        (f"{T_STATE}::test_duplicate_submission_is_dropped", f"{CHAOS}[master_link_cut]")),
    Mutation(
        "duplicate-of-running-task-queued",
        "A task resent under its id runs once (no duplicate work, no second answer)",
        "the broker drops a resent task only while it is queued: a resend of a running task runs again", STATE,
        "        if tid in self.tasks:\n            self.counters[\"duplicates\"] += 1\n",
        "        if tid in self.tasks and self.tasks[tid].state == QUEUED:\n"
        "            self.counters[\"duplicates\"] += 1\n",
        (f"{T_STATE}::test_resent_running_task_is_not_queued_again",
         f"{T_FAIL}::test_resend_of_a_running_task_runs_it_once")),
    Mutation(
        "no-resend-on-new-session", "A master's outstanding tasks survive the broker forgetting it",
        "the master does not resend when PONG carries a new session", MSTATE,
        "        restarted = self.session is not None and session != self.session\n",
        "        restarted = False\n",
        (f"{T_MSTATE}::test_a_new_session_resends_every_outstanding_task_once", f"{CHAOS}[master_frozen]")),
    Mutation(
        "first-pong-resends", "A task is sent once unless something may have lost it",
        "the master resends everything at the first PONG, though nothing was lost", MSTATE,
        "        restarted = self.session is not None and session != self.session\n",
        "        restarted = session != self.session\n",
        (f"{T_MSTATE}::test_tasks_submitted_before_the_first_pong_are_not_sent_twice",)),
    Mutation(
        "no-resend-on-link-return", "A master's outstanding tasks survive a dropped connection",
        "the master does not resend when its socket monitor sees the link come back", MSTATE,
        "        self.resend_due = True\n        self.link.beaten(now)\n",
        "        self.link.beaten(now)\n",
        (f"{T_MSTATE}::test_link_return_resends_at_the_next_pong_only", f"{CHAOS}[master_link_cut]")),
    Mutation(
        "no-resend-on-new-socket", "A master's outstanding tasks survive a link that went silent",
        "the master opens a new socket after silence but does not resend on it", MSTATE,
        "            self.link.reconnected(now)  # a full liveness period (at least the back-off) for the new socket\n"
        "            self.resend_due = True\n",
        "            self.link.reconnected(now)  # a full liveness period (at least the back-off) for the new socket\n",
        (f"{T_MSTATE}::test_silence_asks_for_a_new_socket_and_a_resend_at_the_next_pong",
         f"{CHAOS}[master_link_silent]")),
    Mutation(
        "no-resend-at-all", "A master's outstanding tasks survive a broker crash",
        "the master never resends (session, link return and new socket paths all removed)", MSTATE,
        "    def _resend_all(self, now: float) -> list[Frames]:\n        \"\"\"",
        "    def _resend_all(self, now: float) -> list[Frames]:\n        return []\n        \"\"\"",
        (f"{T_FAIL}::test_broker_killed_and_restarted_mid_job", f"{CHAOS}[broker_crashes]")),
    Mutation(
        "freed-credit-not-indexed", "A worker with free credit gets the queued work it offers to do",
        "a result frees the worker's slot but does not index it for dispatch again", STATE,
        "            lane.inflight.discard(task.tid)\n            self._offer(lane)\n",
        "            lane.inflight.discard(task.tid)\n            self._dirty.update(lane.services)\n",
        (f"{T_STATE}::test_no_dispatch_without_credit_and_credit_returns_on_result",
         "tests/test_broker_dispatch.py::test_dispatch_index_chooses_what_a_scan_would")),
    Mutation(
        "max-queued-counts-all-services", "broker.max_queued bounds each service's queue, no less",
        "QUEUE_FULL counts every task the broker holds, in any service", STATE,
        "        if len(queue) >= self.max_queued:\n", "        if len(self.tasks) >= self.max_queued:\n",
        (f"{T_STATE}::test_max_queued_bounds_each_service_queue_alone", f"{CHAOS}[overload]")),
    Mutation(
        "max-queued-halved", "broker.max_queued bounds each service's queue, no less",
        "QUEUE_FULL fires at half the bound", STATE,
        "        if len(queue) >= self.max_queued:\n", "        if len(queue) >= self.max_queued // 2:\n",
        (f"{T_STATE}::test_queue_full_is_an_explicit_error", f"{CHAOS}[overload]")),
    Mutation(
        "status-replies-in-arrival-order", "Each STATUS reply reaches the request that asked for it",
        "the master hands STATUS replies to waiters in arrival order, ignoring the request id", MSTATE,
        "            future = self.status_waiters.pop(request, None)\n",
        "            future = self.status_waiters.pop(next(iter(self.status_waiters), b\"\"), None)\n",
        (f"{T_MSTATE}::test_status_replies_reach_their_own_request_and_a_withdrawn_one_is_dropped",
         f"{T_MASTER}::test_status_replies_out_of_order_reach_their_requests")),
    Mutation(
        "worker-ignores-cancel", "A task the broker cancelled stops using its compute process at once",
        "the worker daemon ignores W_CANCEL (the lane running the task is not killed)", DAEMON,
        '                    self._kill(lane, "cancel")\n', "                    pass\n",
        # Not task_hangs: there the lane's own timer ends a hung task when the broker cancels it.
        ("tests/test_worker_cancel.py::test_cancel_kills_the_running_task_and_frees_its_process",)),
    Mutation(
        "lane-ignores-cancel", "A task the broker cancelled stops using its compute process at once",
        "a lane runs a task it holds although W_CANCEL for it arrived first", LANE,
        "                    self.queue = deque(t for t in self.queue if t.tid != tid)\n",
        "                    pass\n",
        ("tests/test_worker_cancel.py::test_cancel_of_a_task_waiting_in_the_process_stops_it_before_it_runs",
         f"{CHAOS}[task_hangs]")),
    Mutation(
        "lane-timer-not-armed", "A task over its timeout is stopped on time, even holding the GIL",
        "the lane does not arm its deadline timer (only the daemon's backstop, a second later, kills it)", LANE,
        "            signal.setitimer(signal.ITIMER_REAL, timeout)\n",
        "            pass\n",
        ("tests/test_lanes.py::test_a_handler_holding_the_gil_is_stopped_by_its_lanes_own_timer",)),
    Mutation(
        "no-deadline-backstop", "A task over its timeout is stopped, whatever its handler does to signals",
        "the worker daemon never kills a lane past its deadline", DAEMON,
        '                self._kill(lane, "timeout")\n', "                pass\n",
        ("tests/test_lanes.py::test_a_handler_that_silences_the_timer_is_killed_by_the_daemon",)),
    Mutation(
        "answers-from-anyone", "Only the lane that holds a task can answer it",
        "the broker takes an answer from any connection (a lane presumed dead, a stranger)", STATE,
        "        if lane is None or (sender != lane.wid and sender != lane.host.hid):\n",
        "        if lane is None:\n",
        (f"{T_STATE}::test_late_result_from_a_lane_presumed_dead_is_dropped_and_the_holder_answers",
         f"{T_STATE}::test_the_daemon_reports_for_its_lane_and_nobody_else_does")),
    Mutation(
        "lane-joins-without-key", "Only the lanes of a registered worker get tasks",
        "the broker lets a lane join with any key (it picks some worker)", STATE,
        "        host = self.by_key.get(key)\n",
        "        host = self.by_key.get(key) or next(iter(self.by_key.values()), None)\n",
        (f"{T_STATE}::test_a_lane_needs_its_workers_key_and_an_index_in_range",
         "tests/test_worker_private.py::test_a_connection_posing_as_a_lane_gets_no_task")),
    Mutation(
        "ended-lane-keeps-tasks", "Tasks waiting at a lane that died run elsewhere",
        "the broker forgets a lane that ended without handing back the tasks it held", STATE,
        "        for tid in rec.inflight:\n            task = self.tasks.get(tid)\n"
        "            if task is not None and task.worker == lid and task.state == INFLIGHT:\n",
        "        for tid in ():\n            task = self.tasks.get(tid)\n"
        "            if task is not None and task.worker == lid and task.state == INFLIGHT:\n",
        (f"{T_STATE}::test_lane_gone_hands_back_without_penalty_and_only_for_the_same_process",
         f"{T_STATE}::test_a_dead_daemon_takes_its_lanes_and_their_tasks_count_an_attempt",
         f"{CHAOS}[workers_killed]")),
    Mutation(
        "link-never-silent", "A master whose link went silent opens a new one and resends",
        "the broker-link rule (shared by master and worker daemon) never declares the broker silent",
        "core/link.py", "        return now > self.deadline\n", "        return False\n",
        ("tests/test_link.py::test_silent_only_after_liveness_intervals_without_a_word",
         f"{T_MSTATE}::test_silence_asks_for_a_new_socket_and_a_resend_at_the_next_pong",
         f"{CHAOS}[master_link_silent]")),
    Mutation(
        "lone-call-hands-off", "A lone call pays no thread hand-off: the waiting thread reads its answer",
        "a thread waiting in result() never runs the master's loop (the I/O thread always reads for it)",
        "master/ioloop.py",
        "        if not self.lock.acquire(timeout=DRIVE_WAIT):\n            return False\n        try:\n"
        "            self.owner = threading.get_ident()\n            while not self.closing:\n",
        "        if True:\n            return False\n        try:\n"
        "            self.owner = threading.get_ident()\n            while not self.closing:\n",
        ("tests/test_master_lone.py::test_a_lone_calls_answer_is_read_by_the_thread_waiting_for_it",)),
    Mutation(
        "forgotten-master-keeps-queue", "Work of a master that died is dropped, not computed for nobody",
        "the broker forgets a master but keeps its queued tasks", STATE,
        "            for task in queue.drop_master(master):\n", "            for task in []:\n",
        (f"{T_STATE}::test_silent_master_loses_its_queued_tasks", f"{CHAOS}[master_dies]")),
    Mutation(
        "decoder-allows-any-dtype", "No payload decodes to anything but plain numeric arrays",
        "the decoder accepts every dtype kind (datetime, void, str arrays)", CODEC,
        "    if dt.kind not in _KINDS or dt.hasobject", "    if dt.hasobject",
        ("tests/test_codec.py::test_fuzzed_dtypes_decode_only_to_allowed_kinds",)),
    # ---- issue 10: resident services, arrays sent once, pipelines, streams ----
    Mutation(
        "broken-constructor-crashes-lane", "A resident service whose constructor fails never crash-loops a worker",
        "a constructor's exception ends the lane (it is respawned, fails again, and callers wait)",
        "worker/compute.py", "            broken[name] = error_details(exc)\n", "            raise\n",
        ("tests/test_resident.py::test_a_failing_constructor_leaves_the_worker_up_and_callers_get_its_error",)),
    Mutation(
        "ref-bytes-unchecked", "A host keeps only bytes that hash to the ref's digest",
        "the daemon keeps fetched bytes without checking their digest", "worker/cache.py",
        "        if digest_of(meta, data) != digest:\n", "        if False:\n",
        ("tests/test_refs.py::test_the_cache_keeps_checked_bytes_sealed_and_evicts_least_recently_used",)),
    Mutation(
        "stage-gets-first-input", "Each pipeline stage gets the previous stage's result",
        "the broker passes every stage the pipeline's first input", STATE,
        "        task.payload, task.flags = result, P.FLAG_CHAINED\n", "        task.flags = P.FLAG_CHAINED\n",
        (f"{T_STAGES}::test_each_stage_result_is_the_next_stage_input_and_only_the_last_is_delivered",
         f"{T_STAGES}::test_a_pipeline_runs_each_stage_once_with_no_round_trip_to_the_master",
         f"{CHAOS}[pipeline_killed]")),
    Mutation(
        "stream-rerun-after-parts", "No part of a stream is delivered twice by a rerun",
        "a stream whose lane died after some parts is requeued like any task", STATE,
        "        if task.parts:  # a rerun would deliver", "        if False:  # a rerun would deliver",
        ("tests/test_stream.py::test_a_stream_lost_after_some_parts_fails_instead_of_repeating_them",
         "tests/test_stream.py::test_a_lane_killed_mid_stream_fails_it_without_repeating_a_part")),
    Mutation(
        "stages-wait-behind-new-work", "A free lane serves a pipeline's later stage first, and services take turns",
        "the broker serves waiting services in a fixed order (as set order once did, following the hash seed)",
        STATE, "            service = max(self._dirty, key=self._urgency)\n",
        "            service = min(self._dirty)\n",
        (f"{T_STAGES}::test_a_free_lane_serves_a_pipelines_later_stage_before_new_pipelines[names0]",
         f"{T_STAGES}::test_services_sharing_lanes_take_turns")),
    # ---- issue 11: iterations ----
    Mutation(
        "inbox-in-arrival-order", "A step's inbox is sorted by source: its sums are the same wherever partitions sit",
        "the lane hands the step its inbox in arrival order (local messages first, then remote ones)",
        "worker/partitions.py", "            inbox = sorted(p.inboxes.pop(rnd, []), key=lambda m: m[0])\n",
        "            inbox = p.inboxes.pop(rnd, [])\n",
        (f"{T_ITER}::test_ring_pagerank_and_heat_match_one_process",)),
    Mutation(
        "checkpoint-labelled-a-round-late", "A rollback replays exactly the rounds after the checkpoint",
        "the master files a checkpoint under the round after the one it was taken at", "master/iterate.py",
        "            self.checkpoint = Checkpoint(self.round, [self.pending[p][0] for p in order],\n",
        "            self.checkpoint = Checkpoint(self.round + 1, [self.pending[p][0] for p in order],\n",
        (f"{T_ITER}::test_a_lost_epoch_replays_from_the_last_whole_checkpoint_then_gives_up",
         f"{T_ITER}::test_a_lane_killed_mid_run_rolls_back_and_ends_bit_identical",
         f"{CHAOS}[iterate_lane_killed]")),
    Mutation(
        "lost-lane-unreported", "A run whose partitions died with their lane rolls back instead of waiting",
        "the broker never tells a master that a lane holding its partitions is gone", "broker/iterate.py",
        "            out += self._lost_lanes(run)\n", "            pass\n",
        (f"{T_ITER}::test_a_lost_lane_fails_the_epoch_with_lost_and_the_other_lanes_drop_it",)),
    Mutation(
        "zap-admits-any-key", "With CurveZMQ on, only listed keys connect, each only on its own socket",
        "the ZAP handler admits every CURVE key on both sockets", SECURITY,
        "        if domain == MASTERS:\n            return key in self.masters or key in self.admins\n",
        "        if domain:\n            return True\n",
        (f"{T_SEC}::test_zap_admits_each_key_only_on_its_own_socket",
         f"{T_SEC}::test_keys_refused_where_they_do_not_belong")),
    Mutation(
        "admin-key-submits", "An admin key reads STATUS; only a master key submits",
        "the broker lets any frontend key submit", "broker/server.py",
        "or self.guard.may_submit(self.peer_key):", "or True:",
        (f"{T_SEC}::test_an_admin_only_key_reads_status_but_cannot_submit_and_a_master_sees_only_its_own",)),
    Mutation(
        "task-ids-global", "One master's task id never shadows another master's task",
        "the broker keys tasks by the master's id alone, across masters", "broker/records.py",
        '    return hashlib.blake2b(len(master).to_bytes(1, "big") + master + tid, digest_size=16).digest()\n',
        "    return tid\n",
        (f"{T_SEC}::test_two_masters_may_use_the_same_task_id",
         f"{T_STATE}::test_two_masters_may_use_the_same_task_id_and_each_answer_reaches_its_own_master")),
    Mutation(
        "byte-budget-ignored", "The payload bytes a broker holds are bounded; past a bound, QueueFull names it",
        "the broker never refuses a SUBMIT for its bytes", "broker/budget.py",
        "        if self.total_max and self.held + nbytes > self.total_max:",
        "        if False:",
        ("tests/test_budget.py::test_each_bound_is_named_when_it_refuses",)),
    Mutation(
        "decode-unbounded", "A header cannot decode to far more memory than its size",
        "the decoder skips the object budget", CODEC,
        "        msgcost.estimate(header, max(limits.object_bytes_floor, limits.max_amplification * size))\n",
        "        pass\n",
        ("tests/test_msgcost.py::test_the_amplification_payload_is_refused_before_it_is_decoded",)),
    Mutation(
        "worker-id-handed-over", "With curve on, no socket takes over a connected worker's routing id",
        "the workers' socket keeps ROUTER_HANDOVER with curve on (an impostor under a daemon's id gets its "
        "messages)", "broker/server.py",
        "        handover = not (self.curve and domain == security.WORKERS)\n",
        "        handover = True\n",
        (f"{T_SEC}::test_a_socket_presenting_a_connected_workers_id_gets_nothing",)),
    # ---- issue 13: the spool (a master daemon) ----
    Mutation(
        "spool-reruns-committed-job", "A spool restarted after kill -9 runs no finished job twice",
        "at restart the spool ignores a committed output and runs the job again", "master/spool.py",
        '            if state == "committed" or (self.outbox / f"{name}.npy").is_file():\n',
        "            if False:\n",
        ("tests/test_spool.py::test_a_crash_at_each_point_leaves_one_output_and_reruns_only_unfinished_work"
         "[moved-1]",)),
    Mutation(
        "spool-output-not-atomic", "A spool output is whole or absent, never half written",
        "a committed output holds half its bytes (as a write in place cut short by a kill would)",
        "master/spooljob.py",
        "    os.replace(tmp, path)\n",
        "    os.replace(tmp, path)\n    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])\n",
        ("tests/test_spool.py::test_a_job_runs_once_its_output_is_whole_and_its_inputs_move_to_done",
         f"{CHAOS}[spool_killed]")),
)


def catalog_errors(root: Path, mutations: tuple[Mutation, ...] = MUTATIONS) -> list[str]:
    """Every mutation's text found exactly once, every catcher's file present (the catalog is not stale)."""
    errors = []
    for mut in mutations:
        text = (root / mut.path).read_text()
        if text.count(mut.old) != 1:
            errors.append(f"{mut.name}: text to replace found {text.count(mut.old)} times in {mut.path}")
        for node in mut.catchers:
            path, _, test = node.partition("::")
            if not (root / path).is_file():
                errors.append(f"{mut.name}: catcher file of {node} missing")
            elif f"def {test.split('[')[0]}(" not in (root / path).read_text():
                errors.append(f"{mut.name}: catcher {node} not found in its file")
    return errors


def copy_tree(root: Path, dest: Path) -> Path:
    """Copy the tracked files of ``root`` to ``dest`` and build ``dest/_path/ndpipe`` (symlinks, as
    package-dir maps the folders) so ``PYTHONPATH=dest/_path`` imports the copy. Returns that dir."""
    listing = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(listing, cwd=root, check=True, capture_output=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if not (root / name).is_file():  # deleted, not yet committed
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    path = dest / "_path"
    pkg = path / "ndpipe"
    pkg.mkdir(parents=True)
    for entry in (dest / "core").iterdir():
        (pkg / entry.name).symlink_to(entry)
    for folder, name in PACKAGES.items():
        if folder != "core":
            (path / name).symlink_to(dest / folder)
    return path


def run_catcher(copy: Path, path: Path, node: str, timeout: float) -> tuple[str, float]:
    """Run one catcher in the mutated copy: 'caught' if it fails, 'MISSED' if it passes."""
    env = {**os.environ, "PYTHONPATH": str(path), "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", node],
                              cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "caught (hung)", time.monotonic() - t0
    seconds = time.monotonic() - t0
    if proc.returncode == 0:
        return "MISSED", seconds
    if proc.returncode in (2, 3, 4, 5) and " failed" not in proc.stdout:
        raise RuntimeError(f"{node}: pytest could not run it (exit {proc.returncode}):\n{proc.stdout[-2000:]}")
    return "caught", seconds


def control(root: Path, chosen: list[Mutation], timeout: float) -> bool:
    """Every catcher must pass on an unmutated copy first: a catcher that fails anyway (flaky, broken,
    or the machine too loaded) would count every mutation as caught and prove nothing."""
    nodes = sorted({node for mut in chosen for node in mut.catchers})
    with tempfile.TemporaryDirectory(prefix="ndpmut-") as tmp:
        copy = Path(tmp) / "repo"
        path = copy_tree(root, copy)
        env = {**os.environ, "PYTHONPATH": str(path), "PYTHONDONTWRITEBYTECODE": "1"}
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *nodes], cwd=copy,
                              env=env, capture_output=True, text=True, timeout=timeout * len(nodes))
    if proc.returncode != 0:
        print(f"control: the catchers do not all pass on the unmutated code, so no mutation result would "
              f"mean anything:\n{proc.stdout[-3000:]}")
        return False
    print(f"control: all {len(nodes)} catchers pass on the unmutated code ({time.monotonic() - t0:.0f} s)",
          flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ndpipe.chaos.mutations", description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="mutations to run (default: all)")
    ap.add_argument("--repo", type=Path, default=Path.cwd(), help="the clone to mutate (default: .)")
    ap.add_argument("--list", action="store_true", help="print the catalog and exit")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per catcher run")
    ap.add_argument("--no-control", action="store_true", help="skip running the catchers on the unmutated copy first")
    args = ap.parse_args(argv)
    root = args.repo.resolve()
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        ap.error(f"unknown mutations: {', '.join(sorted(unknown))}")
    if args.list:
        for m in chosen:
            print(f"{m.name}\n  guarantee: {m.guarantee}\n  bug: {m.bug} ({m.path})\n  caught by: "
                  + "\n             ".join(m.catchers))
        return 0
    stale = catalog_errors(root, tuple(chosen))
    if stale:
        print("stale catalog:\n  " + "\n  ".join(stale))
        return 1
    head = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True, text=True)
    print(f"mutating a copy of {root} at {head.stdout.strip() or 'an unknown commit'}", flush=True)
    if not args.no_control and not control(root, chosen, args.timeout):
        return 1
    survivors, misses = [], 0
    for mut in chosen:
        with tempfile.TemporaryDirectory(prefix="ndpmut-") as tmp:
            copy = Path(tmp) / "repo"
            path = copy_tree(root, copy)
            mut.apply(copy)
            print(f"{mut.name}: {mut.bug}", flush=True)
            outcomes = []
            for node in mut.catchers:
                outcome, seconds = run_catcher(copy, path, node, args.timeout)
                outcomes.append(outcome)
                print(f"  {outcome:14} {seconds:6.1f} s  {node}", flush=True)
            misses += outcomes.count("MISSED")
            if all(o == "MISSED" for o in outcomes):
                survivors.append(mut.name)
    print(f"\n{len(chosen)} mutations: {len(chosen) - len(survivors)} caught, {len(survivors)} survived"
          + (f" ({', '.join(survivors)})" if survivors else "") + f"; {misses} catcher(s) missed")
    return 1 if survivors or misses else 0


if __name__ == "__main__":
    sys.exit(main())
