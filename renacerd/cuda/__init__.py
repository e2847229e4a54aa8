"""CUDA layer: hooked symbols, record layouts, library discovery, kernel-name resolution."""
