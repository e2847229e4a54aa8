"""The strace oracle: real programs run under `strace -f` and under renacerd, compared."""
