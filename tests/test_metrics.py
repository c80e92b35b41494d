"""The server's /metrics, read by prometheus_client's own parser during a real load and after it: its counts match
what the clients saw (requests by API and outcome, prompt and generated tokens, latency histograms), and each
replica's requests and KV-cache blocks show while it generates."""

import threading
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serving import KEY, start_server, stop_server, wait_until
from tests.taught import HELLO


@pytest.fixture(scope="module")
def served(taught_model):
    proc, url = start_server(taught_model, "engine.mode=always", f"server.api_key={KEY}", nproc=1)
    yield url, str(taught_model)
    stop_server(proc)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample, by name and labels; no key needed, as for /health."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, w) in ls for k, w in labels.items()))


def test_metrics_count_what_the_clients_saw(served):
    url, model = served
    api = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    before = scrape(url)
    # A long stream running while /metrics is read: the replica shows a request and KV-cache blocks in use.
    long = api.chat.completions.create(
        model=model,
        messages=HELLO,
        max_tokens=400,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = [next(iter(long))]

    def blocks_in_use():
        samples = scrape(url)
        return samples if total(samples, "gptoss:kv_cache_blocks_used", replica="0") > 0 else None

    during = wait_until(blocks_in_use, "the running request's blocks on /metrics")
    assert total(during, "gptoss:requests_running", replica="0") >= 1 and total(during, "gptoss:kv_cache_blocks") > 0
    chunks += list(long)
    usage = {"prompt": chunks[-1].usage.prompt_tokens, "completion": chunks[-1].usage.completion_tokens}
    lock = threading.Lock()

    def chat():
        reply = api.chat.completions.create(model=model, messages=HELLO, max_tokens=20)
        with lock:
            usage["prompt"] += reply.usage.prompt_tokens
            usage["completion"] += reply.usage.completion_tokens

    def responses():
        reply = api.responses.create(model=model, input="Say hello.", max_output_tokens=20)
        with lock:
            usage["prompt"] += reply.usage.input_tokens
            usage["completion"] += reply.usage.output_tokens

    threads = [threading.Thread(target=f) for f in [chat] * 4 + [responses] * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model=model, messages=[], max_tokens=5)

    after = scrape(url)

    def grew(name: str, **labels) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert grew("gptoss:requests_total", api="chat", outcome="stop") == 4
    assert grew("gptoss:requests_total", api="chat", outcome="length") == 1  # the long stream
    assert grew("gptoss:requests_total", api="responses") == 2
    assert grew("gptoss:requests_total", api="chat", outcome="refused") == 1
    assert grew("gptoss:generation_tokens_total") == usage["completion"]
    assert grew("gptoss:prompt_tokens_total") == usage["prompt"]
    assert grew("gptoss:time_to_first_token_seconds_count") == 7
    assert grew("gptoss:e2e_request_latency_seconds_count") == 8  # the refused request too
    assert grew("gptoss:inter_token_latency_seconds_count") >= 399  # the long stream's tokens after its first
