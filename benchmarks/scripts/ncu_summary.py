"""Summarise an Nsight Compute raw-page CSV (`ncu -i REPORT --page raw --csv`) into a small JSON: per profiled
kernel (the first launch of each kernel name and grid size, so sglang's up and down launches of its one
kernel both appear; every launch with --all), its duration and clock, DRAM and L2 traffic, the SM<->L2
and tensor-pipe utilisation, and the warp-stall sample counts as shares of all samples.

  python benchmarks/scripts/ncu_summary.py RAW.csv --out SUMMARY.json [--command "the ncu command line"]
"""
import argparse, csv, datetime, json

METRICS = {  # name in the summary: ncu metric
    "duration_us": "gpu__time_duration.sum",
    "sm_clock_ghz": "sm__cycles_elapsed.avg.per_second",
    "dram_read_gb": "dram__bytes_read.sum",
    "dram_write_gb": "dram__bytes_write.sum",
    "dram_throughput_pct": "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
    "l2_to_sm_read_gb": "l1tex__m_xbar2l1tex_read_bytes.sum",
    "l2_throughput_pct": "lts__throughput.avg.pct_of_peak_sustained_elapsed",
    "l2_sectors_from_sm_pct": "lts__t_sectors_srcunit_tex.avg.pct_of_peak_sustained_elapsed",
    "l2_to_xbar_active_pct": "lts__lts2xbar_cycles_active.avg.pct_of_peak_sustained_elapsed",
    "l2_fill_from_dram_pct": "lts__d_sectors_fill_device.avg.pct_of_peak_sustained_elapsed",
    "tensor_pipe_active_pct": "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
    "issue_slot_idle_pct": "smsp__issue_inst0.avg.pct_of_peak_sustained_active",
    "registers_per_thread": "launch__registers_per_thread",
    "shared_mem_per_block_kb": "launch__shared_mem_per_block_dynamic",
    "grid_size": "launch__grid_size",
    "block_size": "launch__block_size",
}
UNIT_SCALE = {  # convert whatever unit ncu printed to the summary's unit
    "duration_us": {"us": 1, "usecond": 1, "ms": 1e3, "msecond": 1e3, "ns": 1e-3, "nsecond": 1e-3},
    "sm_clock_ghz": {"Ghz": 1, "GHz": 1, "hz": 1e-9, "Mhz": 1e-3, "MHz": 1e-3},
    "dram_read_gb": {"Gbyte": 1, "Mbyte": 1e-3, "Kbyte": 1e-6, "byte": 1e-9, "Tbyte": 1e3},
    "dram_write_gb": {"Gbyte": 1, "Mbyte": 1e-3, "Kbyte": 1e-6, "byte": 1e-9, "Tbyte": 1e3},
    "l2_to_sm_read_gb": {"Gbyte": 1, "Mbyte": 1e-3, "Kbyte": 1e-6, "byte": 1e-9, "Tbyte": 1e3},
    "shared_mem_per_block_kb": {"Kbyte": 1, "byte": 1e-3, "Mbyte": 1e3, "Kbyte/block": 1, "byte/block": 1e-3},
}
STALL = "smsp__pcsamp_warps_issue_stalled_"


def _num(s):
    try:
        return float(s.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def summarise(path, all_launches=False):
    rows = list(csv.reader(open(path)))
    start = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    hdr, units, data = rows[start], rows[start + 1], rows[start + 2:]
    col = {h: i for i, h in enumerate(hdr)}
    out, seen = [], set()
    for r in data:
        name = r[col["Kernel Name"]]
        short = name.split("(")[0].strip()
        grid = r[col["Grid Size"]] if "Grid Size" in col else ""
        if not all_launches and (short, grid) in seen:
            continue
        seen.add((short, grid))
        k = {"kernel": short, "id": int(r[col["ID"]])}
        for key, metric in METRICS.items():
            if metric not in col:
                continue
            v = _num(r[col[metric]])
            if v is None:
                continue
            scale = UNIT_SCALE.get(key, {}).get(units[col[metric]], 1)
            k[key] = round(v * scale, 4)
        hits, reads = (_num(r[col[m]]) if m in col else None for m in (
            "lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum", "lts__t_sectors_srcunit_tex_op_read.sum"))
        if hits is not None and reads:  # derived: the L2 hit rate of the SMs' reads
            k["l2_read_hit_pct"] = round(100 * hits / reads, 1)
        stalls = {h[len(STALL):]: _num(r[i]) for h, i in col.items()
                  if h.startswith(STALL) and not h.endswith("_not_issued") and _num(r[i])}
        total = sum(stalls.values())
        if total:
            k["stall_sample_share_pct"] = {s: round(100 * v / total, 1)
                                           for s, v in sorted(stalls.items(), key=lambda kv: -kv[1]) if v / total >= 0.02}
        out.append(k)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("raw_csv")
    ap.add_argument("--out", required=True)
    ap.add_argument("--command", default=None, help="the ncu command that made the report (kept in the header)")
    ap.add_argument("--gpu", default=None)
    ap.add_argument("--all", action="store_true", help="every launch, not the first of each kernel and grid")
    a = ap.parse_args()
    doc = {"header": {"source": "Nsight Compute raw page", "ncu_command": a.command, "gpu": a.gpu,
                      "summarised": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
           "kernels": summarise(a.raw_csv, a.all)}
    json.dump(doc, open(a.out, "w"), indent=1)
    print(json.dumps(doc["kernels"], indent=1))


if __name__ == "__main__":
    main()
