"""bench.common.time_variants without a GPU: capture and replay stubbed, to check the order in which
variants are timed (reversed every other round, so neither side always runs second) and how the
samples become the reported medians."""

import pytest

torch = pytest.importorskip("torch")

from sglang_gemma4_opt.bench import common  # noqa: E402


@pytest.fixture
def stub(monkeypatch):
    played = []

    def capture(step, calls, warmup):
        return step  # the "graph" is the variant's step; its label comes from the step itself

    def replay(g, calls, replays):
        played.append(g.label)
        return [g.us] * replays

    monkeypatch.setattr(common, "_capture", capture)
    monkeypatch.setattr(common, "_replay_block", replay)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    return played


def _step(label, us):
    def step(i):
        return None
    step.label, step.us = label, us
    return step


@pytest.mark.parametrize("rounds", [1, 2, 4, 5])
def test_order_reverses_every_other_round(stub, rounds):
    out = common.time_variants({"stock": (_step("stock", 10.0), None), "plugin": (_step("plugin", 4.0), None)},
                               calls=3, rounds=rounds, min_replays=2, max_replays=2)
    timed = stub[1:]  # the first replay only sizes the replay count
    assert stub[0] == "stock"
    expect = []
    for r in range(rounds):
        expect += ["stock", "plugin"] if r % 2 == 0 else ["plugin", "stock"]
    assert timed == expect
    assert out["stock"].median_us == 10.0 and out["plugin"].median_us == 4.0
    assert len(out["plugin"].round_medians_us) == rounds and out["plugin"].replays == 2 * rounds


@pytest.fixture
def heats(monkeypatch, stub):
    log = []

    def preheat(g, seconds, per_graph_us):
        log.append((g.label, seconds, per_graph_us))
        stub.append(f"heat:{g.label}")

    monkeypatch.setattr(common, "_preheat", preheat)
    return log


@pytest.mark.parametrize("rounds", [1, 3])
def test_preheat_precedes_every_timed_block_of_long_calls(stub, heats, rounds):
    # one call of 300 us >= preheat_min_us: every timed block follows its own variant's preheat
    out = common.time_variants({"stock": (_step("stock", 300.0), None), "plugin": (_step("plugin", 250.0), None)},
                               calls=2, rounds=rounds, min_replays=2, max_replays=2, preheat_s=0.7,
                               preheat_min_us=200.0)
    timed = stub[1:]
    expect = []
    for r in range(rounds):
        for label in (["stock", "plugin"] if r % 2 == 0 else ["plugin", "stock"]):
            expect += [f"heat:{label}", label]
    assert timed == expect
    # the preheat is sized from the first graph's timed estimate: 300 us per call x 2 calls per graph
    assert {h[1] for h in heats} == {0.7} and {h[2] for h in heats} == {600.0}
    assert out["stock"].preheat_s == 0.7 and out["plugin"].preheat_s == 0.7
    rec = common.record("s", {"M": 1}, "stock", "plugin", out["stock"], out["plugin"], gpu="g")
    assert rec["preheat_s"] == 0.7 and rec["speedup"] == pytest.approx(300.0 / 250.0)


@pytest.mark.parametrize("preheat_s, us", [(0.0, 300.0), (1.0, 150.0)])
def test_no_preheat_when_off_or_calls_are_short(stub, heats, preheat_s, us):
    out = common.time_variants({"stock": (_step("stock", us), None), "plugin": (_step("plugin", us), None)},
                               calls=4, rounds=2, min_replays=2, max_replays=2, preheat_s=preheat_s,
                               preheat_min_us=200.0)
    assert heats == [] and not any(s.startswith("heat:") for s in stub)
    assert out["stock"].preheat_s == 0.0
    rec = common.record("s", {"M": 1}, "stock", "plugin", out["stock"], out["plugin"], gpu="g")
    assert "preheat_s" not in rec
