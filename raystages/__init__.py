"""raystages: pretrain → SFT → reward model → RL on Ray, each stage a real distributed job."""

__version__ = "0.1.0"
