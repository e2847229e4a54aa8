"""renacerd: eBPF-backed tracing of ML training processes, with experiment spans."""

__version__ = "0.1.0"
