"""tunesmith: adapt a pretrained language model to your task, and measure which route wins."""

__version__ = "0.1.0"
