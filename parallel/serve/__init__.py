"""Serving: the OpenAI API shapes, the HTTP server, the rank-0 batcher, the per-replica loop."""
