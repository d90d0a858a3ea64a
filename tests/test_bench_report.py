"""README and benchmarks/README.md numbers are generated from the committed result files, never typed."""

import json
from pathlib import Path

from sglang_gemma4_opt.bench import report

ROOT = Path(__file__).resolve().parents[1]


def test_committed_readmes_match_result_files():
    rc = report.main(["--results", str(ROOT / "benchmarks/results"), "--output", str(ROOT / "benchmarks/README.md"),
                      "--readme", str(ROOT / "README.md"), "--check"])
    assert rc == 0, "run: python -m sglang_gemma4_opt.bench.report"


def test_readme_block_follows_the_records(tmp_path):
    """Change a record and the generated block changes with it (the block is not a constant)."""
    src = ROOT / "benchmarks/results/qkv_norm-NVIDIA_H200.json"
    data = json.loads(src.read_text())
    recs = data["records"] if isinstance(data, dict) else data
    for r in recs:
        r["candidate_us"] = r["baseline_us"] * 2  # the plugin twice as slow
        r["speedup"] = 0.5
    (tmp_path / src.name).write_text(json.dumps(data))
    block = report.readme_block(tmp_path)
    assert "qkv_norm ≥0.95× at every M | min 0.500×" in block
    assert "| **no** |" in block
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_BEGIN}\nold\n{report.README_END}\noutro\n")
    new = report.update_readme(readme, block)
    assert new.startswith("intro\n") and new.endswith("\noutro\n") and "old" not in new
