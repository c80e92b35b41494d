"""A bug found from the server's side in code the server does not own (the engine): the test fails until it is
fixed. The server refuses such prompts at its edge; the in-process Python API of issue 17 would not."""

import pytest
from transformers import GptOssForCausalLM

from parallel.config import EngineConfig
from parallel.distributed.checkpoint import TINY, resolve_checkpoint
from parallel.engine.engine import Engine
from parallel.engine.interface import Sampling, Work, complete
from parallel.protocol.harmony import render_prompt, stop_tokens
from parallel.protocol.requests import parse_request


@pytest.mark.xfail(strict=True, reason="Engine.add takes token ids outside the vocabulary; the step that embeds them "
                                       "raises, which ends every request on the replica")
def test_a_prompt_outside_the_vocabulary_costs_only_itself(enc):
    model = GptOssForCausalLM.from_pretrained(resolve_checkpoint(TINY)).eval()
    engine = Engine(model, EngineConfig(mode="always", slots=2, max_batched_tokens=64, block_size=4), stop_tokens(enc))
    good = render_prompt(enc, parse_request({"prompt": "Hi"}, 0), "medium")
    out = complete(engine, [Work(0, [model.config.vocab_size + 5], 4, Sampling()), Work(1, good, 4, Sampling())])
    assert out[0][1].reason.startswith("error") and len(out[1][0]) == 4
