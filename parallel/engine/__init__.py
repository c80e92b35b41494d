"""Generation backends: the fast engine (cache, graphs, its lean forward, Triton kernels) and the plain
model.generate path."""
