"""The plain path behind the engine's interface: `model.generate` on left-padded batches of up to
`generation.batch_size` requests that sample alike, stopping on harmony's action tokens. It cannot take new
requests while a batch runs; it streams each step's tokens and ends the rows whose clients went away."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers.generation import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from parallel.engine.interface import Event, Sampling, Work, finish_reason


class Plain:
    def __init__(self, model, batch_size: int, stop: dict[int, str], pad_id: int):
        self.model, self.batch_size, self.stop, self.pad_id = model, batch_size, stop, pad_id
        self.waiting: deque[tuple[Work, float]] = deque()
        self.cancelled: list[Event] = []  # requests ended before they ran (aborted, refused)
        self.batches = 0

    def describe(self) -> str:
        return f"plain model.generate, batches of up to {self.batch_size}"

    def close(self) -> None:
        """Nothing held beyond the model."""

    def summary(self) -> str:
        return f"plain: {self.batches} batches"

    def stats(self) -> dict[str, int]:
        return {"requests_waiting": len(self.waiting)}

    def add(self, work: list[Work]) -> None:
        now = time.perf_counter()
        vocab = self.model.config.vocab_size
        for w in work:
            if not w.prompt or min(w.prompt) < 0 or max(w.prompt) >= vocab:
                self.cancelled.append(Event(w.rid, [], f"error: prompt token ids must be in [0, {vocab})"))
            else:
                self.waiting.append((w, now))

    def abort(self, rids: Iterable[int]) -> None:
        rids = set(rids)
        for item in [i for i in self.waiting if i[0].rid in rids]:
            self.waiting.remove(item)
            self.cancelled.append(Event(item[0].rid, [], "cancelled"))

    def busy(self) -> bool:
        return bool(self.waiting or self.cancelled)

    def room(self) -> int:
        return max(0, 2 * self.batch_size - len(self.waiting))

    def step(self, publish: Callable[[list[Event]], None], aborted: Callable[[], set[int]]) -> None:
        """One batch: the oldest waiting request and the next ones that sample the same way. A batch draws from one
        generator, so sampled requests share a batch only with the same seed; greedy ones whatever their seeds."""
        if self.cancelled:
            publish(self.cancelled)
            self.cancelled = []
        if not self.waiting:
            return
        kind = _alike(self.waiting[0][0].sampling)
        batch = [i for i in self.waiting if _alike(i[0].sampling) == kind][: self.batch_size]
        for item in batch:
            self.waiting.remove(item)
        self.batches += 1
        _Batch(self, [w for w, _ in batch], [t for _, t in batch], publish, aborted).run()


class _Batch(BaseStreamer, StoppingCriteria):
    """One model.generate call, as its own streamer (each step's tokens, published) and stopping criterion (each
    row at its own limit, stop token or abort)."""

    def __init__(self, plain: Plain, work: list[Work], arrived: list[float], publish, aborted):
        self.plain, self.work, self.publish, self.aborted = plain, work, publish, aborted
        self.stop = {} if work[0].sampling.ignore_eos else plain.stop
        self.made = [0] * len(work)
        self.done = [False] * len(work)
        self.start = time.perf_counter()
        self.queued = [self.start - t for t in arrived]
        self.first: float | None = None
        self.calls = 0

    def run(self) -> None:
        ids, mask = left_pad([w.prompt for w in self.work], self.plain.pad_id, self.plain.model.device)
        sampling: Sampling = self.work[0].sampling
        config = HFGenerationConfig(  # fresh: the checkpoint's generation_config.json must not change the job's
            max_new_tokens=max(w.max_new_tokens for w in self.work),
            eos_token_id=list(self.stop),  # empty: no stop token (None would bring back the checkpoint's)
            pad_token_id=self.plain.pad_id,
            do_sample=sampling.temperature > 0,
            # float(): JSON's 2 arrives as an int, which transformers refuses as a temperature.
            **(
                {"temperature": float(sampling.temperature), "top_p": float(sampling.top_p)}
                if sampling.temperature > 0
                else {}
            ),
        )
        torch.manual_seed(sampling.seed)
        with torch.no_grad():
            self.plain.model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=config,
                streamer=self,
                stopping_criteria=StoppingCriteriaList([self]),
            )

    def put(self, value: torch.Tensor) -> None:
        """generate() hands the streamer the prompt first, then each step's new tokens."""
        self.calls += 1
        if self.calls == 1:
            return
        now = time.perf_counter()
        self.first = self.first or now - self.start
        events = []
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            self.made[row] += 1
            w = self.work[row]
            reason = finish_reason(token, self.made[row], w.max_new_tokens, self.stop)
            self.done[row] = reason is not None
            events.append(
                Event(w.rid, [token], reason, self.queued[row], self.first) if reason else Event(w.rid, [token])
            )
        self.publish(events)

    def end(self) -> None:
        pass

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        gone = self.aborted()
        ended = []
        for row, w in enumerate(self.work):
            if w.rid in gone and not self.done[row]:
                self.done[row] = True
                ended.append(Event(w.rid, [], "cancelled"))
        if ended:
            self.publish(ended)
        return torch.tensor(self.done, device=input_ids.device)


def _alike(sampling: Sampling) -> tuple:
    seed = sampling.seed if sampling.temperature > 0 else None
    return sampling.temperature, sampling.top_p, sampling.ignore_eos, seed


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the left to one width, and the attention mask that hides the padding."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask
