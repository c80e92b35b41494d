"""The request protocol: input validation, harmony rendering and parsing, prompts with their token budgets."""
