"""batchgate: an async request-batching proxy for LLM inference."""

__version__ = "0.1.0"
