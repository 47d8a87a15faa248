"""gptscale: train GPT models at scale with DeepSpeed (TP x PP x ZeRO-3 DP)."""
__version__ = "0.1.0"
