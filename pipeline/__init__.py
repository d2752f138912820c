"""Training library for multi-stream spatial transformer networks (Jaderberg et al. 2015)."""
__version__ = "0.1.0"
