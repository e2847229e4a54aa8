"""renacerd: eBPF-backed tracing of ML training processes, with experiment spans."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy top-level API: importing renacerd stays cheap for the client library."""
    if name == "load_golden_trace":
        from renacerd.io.runfile import load_golden_trace

        return load_golden_trace
    raise AttributeError(f"module 'renacerd' has no attribute {name!r}")
