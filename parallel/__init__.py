"""gpt-oss on many GPUs with transformers: config, distributed setup, loading, the engine, harmony, batch jobs,
serving, benchmarks."""
