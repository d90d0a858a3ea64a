"""The grouped-MoE tuner's table rule and its candidate list (CPU; the sweep itself runs on a GPU)."""

import json

import pytest
import torch

from sglang_gemma4_opt.bench import tune_moe_grouped as tg
from sglang_gemma4_opt.kernels import moe_grouped as kg


def _row(N, M, speedup, skew=1.0, name="a"):
    return dict(N=N, M=M, speedup=speedup, skew_speedup=skew, params={"block_m": 128, "tag": f"{name}{M}"})


def test_table_starts_where_every_larger_size_wins():
    rows = [_row(704, 1024, 1.10), _row(704, 2048, 1.01), _row(704, 4096, 1.05), _row(704, 16384, 1.08),
            _row(352, 2048, 1.2), _row(352, 4096, 1.2, skew=0.97)]  # N=352: the largest M fails skewed
    t = tg.table_from(rows)
    key = tg.shape_key(128, 704, 2816, 8)
    assert list(t) == [key]  # nothing for N=352: its largest tuned size fails
    assert t[key]["min_m"] == 4096 and list(t[key]["by_m"]) == ["4096", "16384"]  # 1024 wins but 2048 does not
    assert t[key]["by_m"]["16384"]["tag"] == "a16384"


def test_thresholds_are_the_documented_ones():
    assert tg.table_from([_row(704, 2048, 1 + tg.MIN_GAIN - 1e-6)]) == {}
    assert tg.table_from([_row(704, 2048, 1 + tg.MIN_GAIN, skew=1 - tg.MAX_LOSS)]) != {}
    assert tg.table_from([_row(704, 2048, 1.5, skew=1 - tg.MAX_LOSS - 1e-6)]) == {}


def test_every_candidate_is_a_valid_launch_shape():
    for name, fields in tg.CANDIDATES.items():
        p = kg.GroupedParams(**fields)
        assert p.swap_ab == name.startswith("swap"), name
        assert p.block_m in (16, 32, 64, 128, 256) and p.up_block_k % 16 == 0 and p.down_block_k % 16 == 0


def test_skewed_routing_is_skewed_and_distinct():
    torch.manual_seed(0)
    w, ids = tg.skewed_routing(4096, device="cpu")
    assert ids.shape == (4096, 8) and ids.dtype == torch.int32
    assert all(len(set(r)) == 8 for r in ids[:64].tolist())
    counts = torch.bincount(ids.flatten().long(), minlength=128).sort(descending=True).values
    assert counts[:8].sum() > 3 * counts[-64:].sum()  # the top few experts dwarf the tail
    assert torch.allclose(w.sum(-1), torch.ones(4096))


def test_table_file_round_trip(tmp_path):
    rows = [_row(704, 2048, 1.1), _row(704, 4096, 1.2)]
    for r in rows:
        r["params"] = kg.GroupedParams(**tg.CANDIDATES["bm128_u128x64w8s3_d256x64w8s3"]).as_dict()
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"GPU X": tg.table_from(rows)}))
    t = kg.load_table(str(f))
    key = tg.shape_key(128, 704, 2816, 8)
    assert kg.params_for(t, "GPU X", key, 1000) is None
    assert kg.params_for(t, "GPU X", key, 3000).block_m == 128
    assert kg.params_for(t, "GPU X", key, 10 ** 6) == kg.GroupedParams(**tg.CANDIDATES["bm128_u128x64w8s3_d256x64w8s3"])
    assert kg.params_for(t, "GPU Y", key, 3000) is None
    bad = tmp_path / "bad.json"  # (load_table caches per path)
    bad.write_text(json.dumps({"GPU X": {key: {"min_m": 8192, "by_m": {"4096": {}}}}}))
    with pytest.raises(ValueError):
        kg.load_table(str(bad))


def test_candidate_patterns_pick_by_name():
    assert tg.selected() == list(tg.CANDIDATES)
    od = tg.selected(["*_od"])
    assert od and all(n.endswith("_od") for n in od) and all(tg.CANDIDATES[n]["one_dot"] for n in od)
    both = tg.selected(["*_od", "swap_*"])
    assert set(both) == set(od) | {n for n in tg.CANDIDATES if n.startswith("swap_")}
    with pytest.raises(SystemExit):
        tg.selected(["no_such_candidate"])


def test_shipped_pattern_names_what_the_table_ships():
    # the committed table: every shipped launch shape is a candidate (else a re-tune with @shipped could not keep
    # it), and @shipped selects exactly those, for each GPU the table names
    table = json.loads(kg.TABLE_PATH.read_text())
    assert table
    params = {n: kg.GroupedParams(**c) for n, c in tg.CANDIDATES.items()}
    assert len(set(params.values())) == len(params)  # no two names for one shape
    for gpu, shapes in table.items():
        names = tg.shipped_names(table, gpu)
        want = {kg.GroupedParams(**f) for e in shapes.values() for f in e["by_m"].values()}
        assert {params[n] for n in names} == want
        assert tg.selected([tg.SHIPPED], names) == names
        od = tg.selected(["*_od"])
        assert set(tg.selected([tg.SHIPPED, "*_od"], names)) == set(names) | set(od)
    assert tg.shipped_names(table, "GPU not in the table") == []
    with pytest.raises(SystemExit):  # @shipped with nothing shipped selects nothing
        tg.selected([tg.SHIPPED], [])
    # a shipped shape that is no candidate is refused, not silently dropped
    odd = dict(tg.CANDIDATES["bm128_u128x64w8s3_d256x64w8s3"], up_stages=7)
    bad = {"GPU X": {tg.shape_key(128, 704, 2816, 8): {"min_m": 2048, "by_m": {"2048": odd}}}}
    with pytest.raises(SystemExit, match="no candidate"):
        tg.shipped_names(bad, "GPU X")


def test_write_table_merges_a_partial_retune():
    """--write-table: a re-tune of some sizes replaces those and leaves the shape's other sizes (and other shapes)
    as they were; a tuned size that no longer wins cuts the entry there (every M >= min_m goes to the grouped path)."""
    key7, key3 = tg.shape_key(128, 704, 2816, 8), tg.shape_key(128, 352, 2816, 8)

    def current():
        return {key7: {"min_m": 2048, "by_m": {str(m): {"tag": f"old{m}"} for m in (2048, 4096, 8192, 65536)}},
                key3: {"min_m": 4096, "by_m": {"4096": {"tag": "old3"}}}}

    got = tg.merge_into(current(), [_row(704, 4096, 1.2, name="new"), _row(704, 16384, 1.2, name="new")])
    assert got[key3] == current()[key3]
    assert got[key7]["min_m"] == 2048
    assert {m: p["tag"] for m, p in got[key7]["by_m"].items()} == {
        "2048": "old2048", "4096": "new4096", "8192": "old8192", "16384": "new16384", "65536": "old65536"}
    assert list(got[key7]["by_m"]) == ["2048", "4096", "8192", "16384", "65536"]  # sorted by M
    # 8192 re-tuned and losing: the sizes below it leave the table with it
    got = tg.merge_into(current(), [_row(704, 8192, 1.0)])
    assert got[key7] == {"min_m": 65536, "by_m": {"65536": {"tag": "old65536"}}}
    # the largest size losing (skewed routing): no entry for that shape
    got = tg.merge_into(current(), [_row(704, 65536, 1.3, skew=0.9)])
    assert key7 not in got and key3 in got
    # every size re-tuned: the same as a table from the rows alone
    rows = [_row(704, m, 1.1, name="x") for m in (2048, 4096, 8192, 65536)] + [_row(352, 4096, 1.01)]
    assert tg.merge_into(current(), rows) == tg.table_from(rows)


def test_main_reads_shipped_once_and_merges_the_table(tmp_path, monkeypatch):
    """main() without a GPU (the sweep faked): @shipped is read from the table before any shape is tuned and handed
    to every shape's sweep; --write-table merges the new rows by size into that table."""
    from sglang_gemma4_opt import core
    from sglang_gemma4_opt.bench import common

    gpu = "NVIDIA H200"
    table_file = tmp_path / "moe_grouped.json"
    table_file.write_text(kg.TABLE_PATH.read_text())
    before = json.loads(table_file.read_text())
    monkeypatch.setattr(kg, "TABLE_PATH", table_file)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: gpu)
    monkeypatch.setattr(core, "apply", lambda *a, **k: None)
    monkeypatch.setattr(common, "ensure_server_args", lambda *a, **k: None)
    seen = []
    new = kg.GroupedParams(**tg.CANDIDATES["bm128_u128x64w8s3_d256x64w8s3_ht_sn_od_pd"]).as_dict()

    def fake_sweep(N, ms, args, log, shipped=()):
        seen.append((N, list(shipped)))
        return [dict(_row(N, 16384, 1.2), params=new)]

    monkeypatch.setattr(tg, "tune_shape", fake_sweep)
    assert tg.main(["--out", str(tmp_path / "out"), "--ns", "704", "352", "--ms", "16384",
                    "--candidates", tg.SHIPPED, "*_od", "--write-table"]) == 0
    shipped = tg.shipped_names(before, gpu)
    assert seen == [(704, shipped), (352, shipped)]
    after = json.loads(table_file.read_text())
    for key in (tg.shape_key(128, 704, 2816, 8), tg.shape_key(128, 352, 2816, 8)):
        want = dict(before[gpu][key]["by_m"], **{"16384": new})
        assert after[gpu][key]["by_m"] == want
    assert {g: v for g, v in after.items() if g != gpu} == {g: v for g, v in before.items() if g != gpu}
