"""The ``hpt`` command line: a thin dispatcher.

Each subcommand lives with its layer and exposes ``main(argv: list[str]) -> int``; this module only
routes to it and turns user errors into one line on stderr and exit code 2 (internal errors: 1).
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("hpt.train.cli", "train a model (no CONFIG: the embedded HPT demo on a tiny model)"),
    "eval": ("hpt.eval.cli", "evaluate a model on benchmarks: avg@k, pass@k, maj@k"),
    "demo": ("hpt.demo.study", "the comparison study: SFT, GRPO, SFT->GRPO, LUFFY, SRFT, HPT"),
    "report": ("hpt.eval.report", "merge evaluation results into one table, methods as rows"),
    "plot": ("hpt.train.plots", "redraw a run's plots"),
    "algorithms": ("hpt.algorithms", "print the table of algorithms and their four parts"),
}

USAGE = (
    "usage: hpt {"
    + ",".join(COMMANDS)
    + "} ...\n\n"
    + "\n".join(f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items())
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from hpt import __version__

        print(f"hpt {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(
            f"hpt: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr
        )
        return 2
    from hpt.errors import HPTError

    try:
        module = importlib.import_module(COMMANDS[command][0])
        return int(module.main(rest) or 0)
    except HPTError as error:
        print(f"hpt {command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hpt {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
