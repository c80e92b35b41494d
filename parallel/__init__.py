"""gpt-oss on many GPUs with transformers: config, distributed setup, the engine, harmony protocol, batch jobs, serving."""
