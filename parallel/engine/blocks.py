"""The paged KV cache's bookkeeping: which blocks are free, who holds each one, and which hold a known prefix.

One pool of `num_blocks` blocks of `block_size` tokens serves every sequence of a replica. A sequence holds a
list of blocks (its block table); blocks are reference-counted, so sequences that share a prompt prefix share
its blocks (prefix caching). A full block is keyed by a hash of its tokens and its parent's key (as vLLM
does: a collision of 64-bit hashes is not a practical concern); when nobody holds it
any more it stays in the cache, findable, until it is the least recently used free block and is taken for
new tokens. Block 0 is never handed out: padded rows of a CUDA-graph step write their keys there.
Pure Python: every rank of a replica makes the same calls and so holds the same tables.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool):
        if num_blocks < 2:
            raise ValueError(f"a paged KV cache needs at least 2 blocks, got {num_blocks}")
        self.block_size, self.prefix_caching = block_size, prefix_caching
        self.refs = [0] * num_blocks
        # Free blocks, least recently freed first; those with a key stay findable until taken.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.key_of: dict[int, int] = {}
        self.block_of: dict[int, int] = {}
        self.hits = self.queries = 0  # prompt tokens found in the cache, and looked for

    @property
    def capacity(self) -> int:
        """Blocks a single sequence could ever hold."""
        return len(self.refs) - 1

    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> list[int] | None:
        """n blocks for new tokens, or None (nothing taken) when fewer are free."""
        if n > len(self.free):
            return None
        blocks = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            key = self.key_of.pop(block, None)
            if key is not None:
                del self.block_of[key]
            self.refs[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks nobody holds become free (keyed ones stay findable)."""
        for block in reversed(blocks):  # a sequence's last blocks are the least likely to be asked for again
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None

    def match(self, tokens: list[int]) -> tuple[list[int], int | None]:
        """The cached blocks that hold the longest prefix of `tokens` made of full blocks, each now held once more,
        and the last one's key. At least the last token is left out: the model must still compute the logits that
        follow the prompt."""
        blocks, parent = [], None
        if self.prefix_caching:
            for i in range((len(tokens) - 1) // self.block_size):
                key = hash((parent, tuple(tokens[i * self.block_size : (i + 1) * self.block_size])))
                block = self.block_of.get(key)
                if block is None:
                    break
                blocks.append(block)
                parent = key
            for block in blocks:
                if self.refs[block] == 0:
                    del self.free[block]
                self.refs[block] += 1
            self.queries += len(tokens)
            self.hits += len(blocks) * self.block_size
        return blocks, parent

    def forget(self, blocks: list[int]) -> None:
        """Unkey these blocks: what they hold must not be found again (a sequence whose model turned NaN wrote NaN
        keys and values there, even at positions before the one that went wrong: attention weighs a later NaN by
        zero, which is NaN)."""
        for block in blocks:
            key = self.key_of.pop(block, None)
            if key is not None:
                del self.block_of[key]

    def remember(self, blocks: list[int], tokens: list[int], first: int, last: int, parent: int | None) -> int | None:
        """Key a sequence's full blocks first..last-1 (their tokens computed; `parent`: block first-1's key), so
        later prompts can share them. Returns block last-1's key."""
        if not self.prefix_caching:
            return None
        for i in range(first, last):
            key = hash((parent, tuple(tokens[i * self.block_size : (i + 1) * self.block_size])))
            if key not in self.block_of:
                self.key_of[blocks[i]] = key
                self.block_of[key] = blocks[i]
            parent = key
        return parent
