"""Command-line tools behind `sglang-gemma4-opt <subcommand>` (each module: add_arguments, run)."""
