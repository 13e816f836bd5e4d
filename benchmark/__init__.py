"""mugbench: a like-for-like benchmark of self-supervised vision pre-training on web image-text pairs."""

__version__ = "0.1.0"
