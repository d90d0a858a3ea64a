"""Pass/fail rules of the GSM8K regression and its JSON and markdown reports."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Scores come from 3-decimal prints; a limit met exactly must pass despite float rounding.
EPS = 1e-9


@dataclass(frozen=True)
class Thresholds:
    # Upstream's Gemma4 MTP test limits, and the largest drop allowed against stock sglang.
    min_score: float = 0.41
    min_accept_length: float = 1.5
    max_drop: float = 0.02


@dataclass
class RunResult:
    """One server run: `name` is 'plugin' or 'stock'."""

    name: str
    plugin_enabled: bool
    score: float | None = None
    accept_length: float | None = None
    invalid: float | None = None
    latency_s: float | None = None
    output_throughput: float | None = None
    rescored: dict | None = None  # Score.as_dict() from the dumped answers
    startup_s: float | None = None
    server: dict = field(default_factory=dict)  # selected /server_info fields
    plugin_log_lines: list[str] = field(default_factory=list)
    error: str | None = None
    error_log_tail: str | None = None
    notes: list[str] = field(default_factory=list)
    files: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.score is not None


def _check(name: str, value, op: str, limit, enforced: bool = True) -> dict:
    if value is None or limit is None:
        passed = False
    elif op == ">=":
        passed = value + EPS >= limit
    else:
        raise ValueError(op)
    return {"name": name, "value": value, "op": op, "limit": limit, "passed": passed, "enforced": enforced}


def evaluate(plugin: RunResult | None, stock: RunResult | None, th: Thresholds,
             enforce: bool = True, need_accept: bool = True) -> dict:
    """The checks and the verdict.

    Gating (on the plugin run): score >= min_score, accept length >= min_accept_length (when a
    draft model runs), score >= stock score - max_drop (when stock ran). Stock's own score and
    accept length are checked against the same limits for information only: a low stock score
    points at the environment, not at the plugin. With `enforce` False (random weights) every
    check is reported and none decides the verdict.
    """
    checks = []
    if plugin is not None:
        checks.append(_check("plugin score", plugin.score, ">=", th.min_score, enforce))
        if need_accept:
            checks.append(_check("plugin accept length", plugin.accept_length, ">=", th.min_accept_length, enforce))
        if stock is not None:
            limit = None if stock.score is None else round(stock.score - th.max_drop, 6)
            checks.append(_check("plugin score vs stock", plugin.score, ">=", limit, enforce))
    if stock is not None:
        checks.append(_check("stock score", stock.score, ">=", th.min_score, False))
        if need_accept:
            checks.append(_check("stock accept length", stock.accept_length, ">=", th.min_accept_length, False))
    errors = [r.name for r in (plugin, stock) if r is not None and not r.ok]
    gating = [c for c in checks if c["enforced"]]
    return {
        "enforced": enforce,
        "checks": checks,
        "errors": errors,
        "passed": not errors and all(c["passed"] for c in gating),
    }


def exit_code(verdict: dict) -> int:
    """0 passed; 2 a run failed to produce a score (server or client error); 1 a limit was missed."""
    if verdict["errors"]:
        return 2
    return 0 if verdict["passed"] else 1


def write_reports(out_dir: str | Path, payload: dict) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / "gsm8k_report.json", out / "gsm8k_report.md"
    j.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    m.write_text(render_markdown(payload))
    return j, m


def _fmt(v, nd=3) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def render_markdown(payload: dict) -> str:
    v = payload["verdict"]
    runs = payload["runs"]
    status = "PASSED" if v["passed"] else "FAILED"
    if not v["enforced"]:
        status = "NOT ENFORCED (random weights)" + ("" if not v["errors"] else f"; errors in {', '.join(v['errors'])}")
    lines = [f"# GSM8K regression: {status}", ""]
    if payload.get("random_weights"):
        lines += ["> The model runs with random (dummy) weights: scores are ~0 and accept lengths are not",
                  "> meaningful. This run checks the pipeline (servers start with the plugin, MTP decodes,",
                  "> the client scores, reports are written, servers stop); the limits below are reported",
                  "> but do not decide the exit status.", ""]
    cfg = payload["config"]
    lines += [f"- model: `{cfg['model_path']}`; draft: `{cfg.get('draft_model_path')}`; TP {cfg['tp']}",
              f"- {cfg['num_questions']} questions, {cfg['num_shots']}-shot, data `{cfg['data_path']}`",
              f"- server args: `{' '.join(cfg.get('server_args', []))}`",
              f"- versions: {', '.join(f'{k} {v}' for k, v in payload.get('versions', {}).items())}", ""]
    lines += ["| run | SGLANG_GEMMA4_OPT | score | rescored | accept length | invalid | latency s | startup s | error |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        rs = r.get("rescored") or {}
        resc = f"{rs['correct']}/{rs['total']}" if rs else "n/a"
        err = (r.get("error") or "").replace("|", "/").replace("\n", " ")[:120]
        lines.append(f"| {r['name']} | {'1' if r['plugin_enabled'] else '0'} | {_fmt(r.get('score'))} | {resc} | "
                     f"{_fmt(r.get('accept_length'))} | {_fmt(r.get('invalid'))} | {_fmt(r.get('latency_s'), 1)} | "
                     f"{_fmt(r.get('startup_s'), 1)} | {err} |")
    notes = [f"- {r['name']}: {n}" for r in runs for n in r.get("notes") or []]
    if notes:
        lines += [""] + notes
    lines += ["", "| check | value | limit | result |", "|---|---:|---:|---|"]
    for c in v["checks"]:
        res = ("pass" if c["passed"] else "FAIL") + ("" if c["enforced"] else " (not enforced)")
        lines.append(f"| {c['name']} | {_fmt(c['value'])} | {c['op']} {_fmt(c['limit'])} | {res} |")
    for r in runs:
        if r.get("error_log_tail"):
            lines += ["", f"## {r['name']}: end of the log", "", "```", r["error_log_tail"], "```"]
        if r.get("plugin_log_lines"):
            lines += ["", f"## {r['name']}: plugin lines in the server log ({len(r['plugin_log_lines'])})", "", "```"]
            lines += r["plugin_log_lines"][:20] + ["```"]
    return "\n".join(lines) + "\n"


def run_dict(r: RunResult) -> dict:
    return asdict(r)
