"""The decode thread computes on the engine's configured cores whatever the runtime's worker threads do: in torch
a thread's `set_num_threads` becomes the default of every thread started after it, so a worker limiting itself
to one core once put the server's scheduler thread (started after `load`) on one core too."""
import threading

import pytest
import torch

import dynaexq
from dynaexq.engine.batch import SamplingParams
from dynaexq.engine.scheduler import Scheduler


@pytest.mark.parametrize("policy, budget", [("dynaexq", "int3"), ("multilevel", "int3"), ("dynaexq", "2MiB")])
def test_a_decode_step_on_the_scheduler_thread_uses_the_configured_threads(bundled_store, policy, budget):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = dynaexq.load(bundled_store, policy=policy, expert_budget=budget, threads=2, progress=False)
        try:
            assert engine.threads == 2
            if budget == "2MiB":
                assert engine.runtime.stats()["offload"] is not None  # the offload regime's readers ran
            seen = []
            bank = next(iter(engine.banks.values()))
            hook = bank.register_forward_pre_hook(
                lambda *_: seen.append((threading.current_thread().name, torch.get_num_threads())))
            done = threading.Event()
            sched = Scheduler(engine, max_batch=2)
            try:
                ids = engine.tokenizer("def add(a, b):")["input_ids"]
                for _ in range(2):
                    sched.submit(ids, SamplingParams(max_tokens=6, temperature=0),
                                 lambda seq, delta: seq.finished and done.set())
                assert done.wait(120)
            finally:
                sched.close()
                hook.remove()
            assert seen and all(name == "dynaexq-scheduler" for name, _ in seen), seen
            assert {n for _, n in seen} == {2}, seen
            workers = [t for t in threading.enumerate() if t.name.startswith("dynaexq-fetch")]
            assert workers  # and they run on one thread each: checked from inside one
            later = []
            t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
            t.start()
            t.join()
            assert later == [2]  # the workers' own limit is not every later thread's default
        finally:
            engine.close()
    finally:
        torch.set_num_threads(before)


def test_threads_is_validated(bundled_store):
    with pytest.raises(dynaexq.UserError, match="threads"):
        dynaexq.load(bundled_store, policy="uniform:int8", threads=0, progress=False)


def test_a_passive_openmp_wait_policy_is_named_once(monkeypatch, capsys):
    from dynaexq import threads
    monkeypatch.setattr(threads, "_warned", [])
    assert not threads.check_wait_policy({"OMP_WAIT_POLICY": "active"})
    assert not threads.check_wait_policy({})
    assert capsys.readouterr().err == ""
    assert threads.check_wait_policy({"OMP_WAIT_POLICY": "PASSIVE"})
    assert "OMP_WAIT_POLICY=passive" in capsys.readouterr().err
    assert not threads.check_wait_policy({"OMP_WAIT_POLICY": "passive"})  # once per process
