"""`python -m sglang_gemma4_opt.bench.serve_client ARGS`: sglang's own `bench_serving` with ARGS, made to
work against a dummy-weights server; `... serve_client --plan FILE` runs several such passes in one process.

Three things differ from `python -m sglang.bench_serving ARGS`:

* First token by token count, not by text. bench_serving's sglang client counts a streamed chunk as
  tokens only when its `text` is non-empty, so a token that decodes to nothing (a special token, which
  a random-weights model emits as readily as any other, and which the dummy tokenizer drops) delays
  the measured first token and shifts the inter-token gaps. Here each chunk's JSON is read as usual, and
  a chunk whose `meta_info.completion_tokens` grew but whose text is empty gets a one-character
  placeholder text, so bench_serving's own timing code sees it as the token it is. Only the text that
  `generated_text` keeps changes (a placeholder where nothing would show); every count and time is
  bench_serving's.
* The `datasets` package is needed only to import bench_serving (one of its dataset modules imports it
  at the top); when it is missing, a stand-in module whose `load_dataset` raises is registered, so the
  random-token datasets run.
* `--plan FILE` (JSON: {"passes": [{"name": N, "argv": [bench_serving arguments]}, ...]}) runs the passes in
  turn in one process, the tokenizer loaded once: importing bench_serving and loading the 262144-word
  tokenizer takes 5-8 s, more than many passes themselves. After each pass one line
  `SERVE_CLIENT_PASS {"name": N, "ok": true|false, "error": ...}` is printed; a failing pass does not stop the
  others.

bench_serving lives in `sglang.bench_serving` (sglang <= 0.5.12) or `sglang.benchmark.serving` (later;
the old name re-exports it); whichever module defines `async_request_sglang_generate` is patched.
"""

from __future__ import annotations

import ast
import functools
import importlib
import json
import sys
import traceback
import types

PASS_PREFIX = "SERVE_CLIENT_PASS "
PLACEHOLDER = "\u2026"  # the text a token-bearing chunk with empty text is given
MODULES = ("sglang.benchmark.serving", "sglang.bench_serving")


def ensure_datasets_importable() -> bool:
    """Register a stand-in `datasets` module when the real one is missing; True if it did."""
    try:
        importlib.import_module("datasets")
        return False
    except ImportError:
        pass
    stub = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        raise ImportError("the 'datasets' package is not installed (sglang-gemma4-opt's bench_serving wrapper "
                          "stands in for it so that the random datasets run)")

    stub.load_dataset = load_dataset
    stub.__sglang_gemma4_opt_stub__ = True
    sys.modules["datasets"] = stub
    return True


def with_token_text(data):
    """A decoded stream chunk, with placeholder text where tokens arrived but no text did."""
    if isinstance(data, dict) and not data.get("text"):
        meta = data.get("meta_info")
        if isinstance(meta, dict) and (meta.get("completion_tokens") or 0) > 0:
            data = dict(data, text=PLACEHOLDER)
    return data


class TokenCountingDecoder:
    """Stands in for the `json` / `orjson` module inside bench_serving: `loads` marks token-bearing chunks
    (see `with_token_text`); every other attribute is the real module's."""

    def __init__(self, real):
        self._real = real

    def loads(self, s, *args, **kwargs):
        return with_token_text(self._real.loads(s, *args, **kwargs))

    def __getattr__(self, name):
        return getattr(self._real, name)


def load_bench_module():
    """The module that holds bench_serving's sglang client (imported with `datasets` available)."""
    ensure_datasets_importable()
    errors = []
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
            continue
        if hasattr(mod, "async_request_sglang_generate"):
            return mod
        errors.append(f"{name}: no async_request_sglang_generate")
    raise ImportError("no bench_serving module found (" + "; ".join(errors) + ")")


def patch(mod) -> list[str]:
    """Route the module's chunk decoding through TokenCountingDecoder; returns the names replaced."""
    done = []
    for name in ("orjson", "json"):
        real = mod.__dict__.get(name)
        if isinstance(real, types.ModuleType):
            setattr(mod, name, TokenCountingDecoder(real))
            done.append(name)
    if not done:
        raise RuntimeError(f"{mod.__name__} decodes its stream with neither json nor orjson")
    return done


def _main_block(mod) -> types.CodeType:
    """The body of the module's `if __name__ == "__main__":` block (sglang <= 0.5.12 parses its arguments
    there), compiled to run in the module's namespace."""
    src = open(mod.__file__, encoding="utf-8").read()
    tree = ast.parse(src)
    for node in tree.body:
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"):
            body = ast.Module(body=node.body, type_ignores=[])
            return compile(body, mod.__file__, "exec")
    raise RuntimeError(f"{mod.__file__} has no __main__ block")


def _runner(mod):
    """A function that runs bench_serving's command line (sys.argv) in `mod`'s namespace."""
    if callable(getattr(mod, "cli_main", None)):
        return mod.cli_main
    code = _main_block(mod)
    return lambda: exec(code, mod.__dict__)


def run_plan(mod, plan: dict) -> int:
    """Each pass of the plan in turn; returns how many failed."""
    tok = getattr(mod, "get_tokenizer", None)
    if callable(tok):  # one tokenizer load for every pass of the plan
        mod.get_tokenizer = functools.lru_cache(maxsize=4)(tok)
    runner = _runner(mod)
    failed = 0
    for p in plan["passes"]:
        sys.argv = [mod.__name__] + [str(a) for a in p["argv"]]
        ok, err = True, None
        try:
            runner()
        except SystemExit as e:  # argparse errors and explicit exits
            ok, err = e.code in (0, None), f"exit {e.code}"
        except Exception as e:  # one pass failing leaves the others to run
            ok, err = False, f"{type(e).__name__}: {e}"
            traceback.print_exc()
        failed += not ok
        print(PASS_PREFIX + json.dumps({"name": p.get("name"), "ok": ok, "error": err}), flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mod = load_bench_module()
    patch(mod)
    if argv[:1] == ["--plan"] and len(argv) == 2:
        with open(argv[1], encoding="utf-8") as f:
            return 1 if run_plan(mod, json.load(f)) else 0
    sys.argv = [mod.__name__] + argv
    _runner(mod)()
    return 0


if __name__ == "__main__":
    sys.exit(main())
