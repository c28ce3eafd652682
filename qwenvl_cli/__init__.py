"""qwenvl: Qwen2.5-VL image, document and video understanding from the command line, in plain PyTorch."""

__version__ = "0.1.0"
