"""The next token of each row: greedy, or sampled with temperature and top-p from noise that depends only on the
request's seed and the token's position, so a sampled request gives the same tokens whatever else shares its
steps (a batch job's replicas claim work in whatever order they finish; a server's rows come and go)."""

from __future__ import annotations

import torch

from parallel.engine.noise import uniform

# Rows torch draws at once. The noise's int64 (rows, vocab) temporaries take 8 bytes a logit, several at a time: at
# gpt-oss's 201,088-token vocabulary, a launcher's mixed steps of hundreds of sampled rows ran an H100 out of memory
# in the few GiB the KV cache leaves (CACHE_HEADROOM_BYTES). 128 rows keep each near 200 MB.
ROWS = 128


def scale(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Logits over each row's temperature, in float32 (a temperature of 0 is the caller's greedy row)."""
    return logits.float() / temperature.clamp_min(1e-6)[:, None]


def gumbel_argmax(scaled: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Each row's draw from softmax(scaled): the argmax of scaled plus Gumbel noise from the hash."""
    return (scaled - torch.log(-torch.log(uniform(seeds, positions, scaled.shape[-1])))).argmax(-1)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    cut: torch.Tensor | None,
) -> torch.Tensor:
    """Row r's token: argmax where temperature[r] == 0, else a draw from softmax(logits / temperature), cut where
    top_p[r] < 1 to the smallest set of tokens whose probability reaches it. `cut`: the indices of the rows whose
    top_p is below 1 (None: no row's), told by the caller, which knows them without asking the device (a sync), so
    that only those rows pay for the sort. On GPU one Triton kernel draws the other rows, all in one launch, as it
    keeps nothing of size (rows, vocab) (parallel/engine/kernels/gumbel.py); torch draws ROWS rows at a time. A
    row's path depends on its own top_p only, and its token on that row alone, so rows may be drawn in any
    grouping."""
    if logits.is_cuda:
        from parallel.engine.kernels.gumbel import gumbel_argmax as kernel  # triton: GPU builds of torch bring it

        noisy = kernel(logits, temperature, seeds, positions)
    else:
        noisy = _by_rows(_uncut, logits, temperature, seeds, positions)
    if cut is not None:
        noisy = noisy.index_put(
            (cut,), _by_rows(_cut, *(c[cut] for c in (logits, temperature, top_p, seeds, positions)))
        )
    return torch.where(temperature > 0, noisy, logits.argmax(-1))


def _uncut(
    logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    return gumbel_argmax(scale(logits, temperature), seeds, positions)


def _cut(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """The draw among the smallest set of tokens whose probability reaches top_p."""
    scaled = scale(logits, temperature)
    probs, order = torch.softmax(scaled, -1).sort(-1, descending=True)
    outside = probs.cumsum(-1) - probs >= top_p[:, None]
    kept = scaled.scatter(-1, order, torch.where(outside, float("-inf"), scaled.gather(-1, order)))
    return gumbel_argmax(kept, seeds, positions)


def _by_rows(draw, *columns: torch.Tensor) -> torch.Tensor:
    """`draw` over ROWS rows at a time."""
    return torch.cat([draw(*(c[i : i + ROWS] for c in columns)) for i in range(0, len(columns[0]), ROWS)])
