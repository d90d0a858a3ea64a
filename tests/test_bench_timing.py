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
