"""fastross: a high-throughput trainer for ROSS vision-language models."""

__version__ = "0.1.0"
