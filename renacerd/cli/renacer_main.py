"""`renacer`: read the store — runs, show, compare, export, push."""

from __future__ import annotations

import importlib
import sys

from renacerd.cli.common import EXIT_USAGE

# One module per subcommand (memray style); each has main(argv) -> exit status.
COMMANDS = {
    "runs": ("renacerd.cli.runs", "list the runs in the store"),
    "show": ("renacerd.cli.show", "a run's process tree, syscall table, files, losses"),
    "spans": ("renacerd.cli.spans", "a run's experiment spans with their syscalls"),
    "ranks": ("renacerd.cli.ranks", "per step and rank: stragglers, their causes, desyncs"),
    "compare": ("renacerd.cli.compare", "are two runs behaviourally equivalent?"),
    "export": ("renacerd.cli.export", "golden trace file, Perfetto JSON or JSON lines"),
    "push": ("renacerd.cli.push", "send a stored run to ClickHouse"),
    "status": ("renacerd.cli.status", "what the renacerd service is tracing now"),
    "dump": ("renacerd.cli.dump", "keep a flight-recorder run's current window whole"),
    "gc": ("renacerd.cli.gc", "prune old runs' events to fit a size and age budget"),
    "rm": ("renacerd.cli.rm", "delete runs from the store"),
}


def usage() -> str:
    """The command list."""
    lines = ["usage: renacer COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the subcommand's module."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0 if argv else EXIT_USAGE
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"renacer: error: unknown command {name!r} (try renacer --help)\n")
        return EXIT_USAGE
    mod = importlib.import_module(COMMANDS[name][0])
    try:
        return int(mod.main(rest))
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
