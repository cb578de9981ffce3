"""capfilt: CapFilt data bootstrapping and Q-Former training on Ray Data and Prefect."""

__version__ = "0.1.0"
