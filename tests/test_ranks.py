"""run_ranks: how rank processes start (forkserver with preloaded modules, or spawn), what
environment they see, and that a rank's failure or death still reaches the caller."""

from __future__ import annotations

import os
import secrets
import sys

import pytest

from hybridiff_rt.testing import all_ok, ranks, run_ranks

FORKSERVER = "forkserver" in __import__("multiprocessing").get_all_start_methods()


def _rank_facts(rank: int, names: list[str]) -> dict:
    """What a rank sees: its environment, the environment and thread count of its parent process
    (the forkserver, when forked from one) and the modules imported before this function ran."""
    parent = os.getppid()
    try:
        parent_threads = len(os.listdir(f"/proc/{parent}/task"))
        with open(f"/proc/{parent}/environ", "rb") as f:
            entries = [e.decode().partition("=") for e in f.read().split(b"\0") if e]
        parent_env = {k: v for k, _, v in entries if k in names}
    except OSError:
        parent_threads = parent_env = None
    return {"env": {n: os.environ.get(n) for n in names}, "rank_env": os.environ["RANK"],
            "parent": parent, "parent_threads": parent_threads, "parent_env": parent_env,
            "preloaded": sorted(m for m in ranks.PRELOAD if m in sys.modules)}


def _rank_fails(rank: int) -> None:
    if rank == 1:
        raise ValueError("rank one says no")


def _rank_exits(rank: int) -> int:
    if rank == 1:
        os._exit(3)
    return rank


@pytest.mark.skipif(not FORKSERVER, reason="no forkserver start method on this platform")
def test_forked_ranks_share_a_single_threaded_preloaded_server_and_see_the_callers_environment():
    first = all_ok(run_ranks(_rank_facts, ["PYTEST_CURRENT_TEST"]))
    second = all_ok(run_ranks(_rank_facts, ["PYTEST_CURRENT_TEST"]))
    assert ranks.start_method() == "forkserver"
    servers = {facts["parent"] for facts in first + second}
    assert len(servers) == 1 and os.getpid() not in servers  # forked from one server, not us
    for rank, facts in enumerate(first + second):
        assert facts["rank_env"] == str(rank % 2)
        assert facts["parent_threads"] in (1, None)  # a fork from a threaded process is unsafe
        # a module that fails to import is skipped by the server; torch never does
        assert "torch" in facts["preloaded"] and "torch.distributed" in facts["preloaded"]
        # the volatile name follows the caller, not the server's start-up value
        assert facts["env"]["PYTEST_CURRENT_TEST"] == os.environ["PYTEST_CURRENT_TEST"]


@pytest.mark.skipif(not FORKSERVER, reason="no forkserver start method on this platform")
def test_a_changed_environment_restarts_the_server_and_an_env_argument_spawns(monkeypatch):
    before = {f["parent"] for f in all_ok(run_ranks(_rank_facts, []))}
    name, value = f"HYBRIDIFF_RT_TEST_{secrets.token_hex(4).upper()}", secrets.token_hex(8)
    monkeypatch.setenv(name, value)
    changed = all_ok(run_ranks(_rank_facts, [name]))
    servers = {f["parent"] for f in changed}
    assert len(servers) == 1 and servers.isdisjoint(before | {os.getpid()})  # a new server
    for facts in changed:
        assert facts["env"][name] == value
        if facts["parent_env"] is not None:  # it imported its modules under the new value
            assert facts["parent_env"] == {name: value}
    monkeypatch.delenv(name)
    restored = all_ok(run_ranks(_rank_facts, [name]))
    assert {f["parent"] for f in restored}.isdisjoint(servers | {os.getpid()})
    assert all(f["env"][name] is None for f in restored)
    other = secrets.token_hex(8)
    assert ranks.start_method({name: other}) == "spawn"
    for facts in all_ok(run_ranks(_rank_facts, [name], env={name: other})):
        assert facts["env"][name] == other and facts["parent"] == os.getpid()  # spawned by us
    monkeypatch.setenv("HYBRIDIFF_RT_RANKS_START", " Spawn ")
    assert ranks.start_method() == "spawn"
    assert all(f["parent"] == os.getpid() for f in all_ok(run_ranks(_rank_facts, [])))
    monkeypatch.setenv("HYBRIDIFF_RT_RANKS_START", "fork")
    with pytest.raises(ValueError, match="HYBRIDIFF_RT_RANKS_START='fork': set it to auto or "
                                         "spawn"):
        run_ranks(_rank_facts, [])


@pytest.mark.parametrize("start", ["default", "spawn"])
def test_a_failing_rank_and_a_dead_rank_reach_the_caller(monkeypatch, start):
    if start == "spawn":
        monkeypatch.setenv("HYBRIDIFF_RT_RANKS_START", "spawn")
    failed = run_ranks(_rank_fails)
    assert failed[0].ok and not failed[1].ok
    assert failed[1].error_type == "ValueError" and "rank one says no" in failed[1].error
    with pytest.raises(AssertionError, match="rank 1 failed: ValueError"):
        all_ok(failed)
    died = run_ranks(_rank_exits, timeout_s=60)
    assert set(died) == {0} and died[0].value == 0
    with pytest.raises(AssertionError, match=r"ranks \[1\] never reported"):
        all_ok(died)
