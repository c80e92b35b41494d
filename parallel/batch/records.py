"""Output records: one JSON object per input line, what resume matches them on."""

from __future__ import annotations

from parallel.engine.interface import Completion
from parallel.protocol.harmony import Parsed


def record_key(record: dict) -> tuple:
    """What resume matches on: the id, or the line for records that could not claim one."""
    return ("id", record["id"]) if record["id"] is not None else ("index", record["index"])


def error_record(rid, index: int, message: str, prompt_tokens: int = 0) -> dict:
    return {
        "id": rid,
        "index": index,
        "final": None,
        "analysis": None,
        "tool_calls": [],
        "finish_reason": "error",
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0},
        "error": message,
    }


def result_record(
    rid, index: int, prompt_tokens: int, completion: Completion, parsed: Parsed, raw: str, keep_raw: bool
) -> dict:
    """`raw` (the completion with its special tokens) is kept when asked for, and always beside a parse error."""
    record = {
        "id": rid,
        "index": index,
        "final": parsed.final,
        "analysis": parsed.analysis,
        "tool_calls": parsed.tool_calls,
        "finish_reason": "error" if parsed.error else completion.finish_reason,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(completion.tokens)},
        "error": parsed.error,
    }
    if parsed.error or keep_raw:
        record["raw"] = raw
    return record
