"""The paged KV cache: a pool of fixed-size pages per layer, a page table and an allocator.

Letters: B sequence slots, L layers, K kv heads, H head dim, A pages in the pool, P tokens
per page, M pages per slot (page-table width, ``max_len = M * P``), T tokens written.

Layout (the one ``kernels_pallas.paged_attention`` and JAX's Pallas kernels take): each
layer owns ``k[l]`` / ``v[l]`` of shape ``[K, A, P, H]``; token ``t`` of slot ``b`` lives at
page ``page_table[b, t // P]``, row ``t % P``; ``lengths[b]`` tokens of slot ``b`` are valid.

Page ``NULL_PAGE`` (0) is reserved and never allocated: every page-table entry a slot does
not own points at it.  Writes that fall outside a slot's pages (a free slot's decode write,
the bucket padding of a prefix past its last page) land there harmlessly, and the attention
kernels, which load whole blocks of pages, always read a valid page.  One page of the pool
is the price (vLLM reserves a null block the same way).

Who does what:

* ``PageAllocator`` (host, Python): which pages belong to which sequence.  The engine asks
  it for pages before a step that needs them (``extend`` to the length after the step),
  gets the rows of the page table from it, and frees a sequence's pages when it ends.
* ``PagedKVCache`` (device, a pytree): the pages themselves, the page table and lengths.
  ``write_token`` (the decode write, one token per slot and layer) and ``write_prefix``
  (the hand-off insert of a prefilled dense prefix) are pure, jittable and run in place on
  a donated cache.

Why the allocator lives on the host rather than in jitted functions (MaxText's
``PageState`` is the jitted design): ``scripts/bench_paged_allocator.py`` (output in
``reports/paged/``) runs one decode step of 32 sequences growing by one token, pages of 16:

* host free list + ``device_put`` of the changed page table: 52 to 126 µs per step;
* the same bookkeeping as one jitted function on device arrays: 107 to 333 µs;
* that jitted step plus reading the free-page count back, which the scheduler needs to
  admit, preempt or cancel: 266 to 518 µs (on the H200 a round trip alone is 76 µs,
  ANCHORS.md).

(Three runs on a shared 2-core CPU at load 7 to 10, hence the spread.)  Raw cost is a tie
at best for the jitted form; what decides is that admission, preemption and cancellation
are host decisions that need the free count every step, which the host allocator knows
without a device sync, and that its work overlaps the device's step under async dispatch.
The page table it produces is small (``B * M`` int32, 64 KiB at B = 32, M = 512).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from sunjax.cache import KVCache

NULL_PAGE = 0


class OutOfPages(RuntimeError):
    """The pool has fewer free pages than a request needs (nothing was allocated)."""


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages needed to hold ``num_tokens`` tokens."""
    return -(-num_tokens // page_size)


def page_bytes(cfg, page_size: int, dtype: str | None = None) -> int:
    """Bytes of one page over all layers, K and V: ``2 * L * K * P * H * itemsize``."""
    itemsize = jnp.dtype(dtype or cfg.dtype).itemsize
    return 2 * cfg.n_layers * cfg.n_kv_heads * page_size * cfg.head_dim * itemsize


class PageAllocator:
    """Host-side free list of the pages ``1 .. num_pages - 1`` (page 0 is ``NULL_PAGE``).

    Sequences are named by any hashable id.  ``allocate`` / ``extend`` are all or nothing:
    they raise ``OutOfPages`` and change nothing when the pool is short.  Freed pages are
    reused first (LIFO).  ``check()`` verifies every invariant.

        alloc = PageAllocator(num_pages=1024, page_size=16, max_pages_per_seq=128)
        alloc.allocate("req-1", 40)       # 3 pages
        alloc.extend("req-1", 49)         # [page] : the 4th page
        row = alloc.page_row("req-1")     # int32 [128], padded with NULL_PAGE
        alloc.free("req-1")
    """

    def __init__(self, num_pages: int, page_size: int, max_pages_per_seq: int):
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages} must be >= 2 (page 0 is the null page)")
        if page_size < 1:
            raise ValueError(f"page_size={page_size} must be >= 1")
        if max_pages_per_seq < 1:
            raise ValueError(f"max_pages_per_seq={max_pages_per_seq} must be >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self.max_pages_per_seq = max_pages_per_seq
        self._free: list[int] = list(range(num_pages - 1, 0, -1))  # pop() -> lowest first
        self._pages: dict[Hashable, list[int]] = {}
        self._tokens: dict[Hashable, int] = {}

    # -- queries ---------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Allocatable pages (all but the null page)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return sum(len(p) for p in self._pages.values())

    def __contains__(self, seq: Hashable) -> bool:
        return seq in self._pages

    def __len__(self) -> int:
        return len(self._pages)

    def pages(self, seq: Hashable) -> tuple[int, ...]:
        return tuple(self._pages[self._known(seq)])

    def num_tokens(self, seq: Hashable) -> int:
        """Tokens the sequence's pages were sized for (its last ``allocate``/``extend``)."""
        return self._tokens[self._known(seq)]

    def pages_needed(self, seq: Hashable | None, num_tokens: int) -> int:
        """New pages that growing ``seq`` (``None``: a new sequence) to ``num_tokens`` takes."""
        have = 0 if seq is None else len(self._pages[self._known(seq)])
        return max(0, pages_for(num_tokens, self.page_size) - have)

    def can_fit(self, seq: Hashable | None, num_tokens: int) -> bool:
        return self.pages_needed(seq, num_tokens) <= self.num_free

    def page_row(self, seq: Hashable | None, width: int | None = None) -> np.ndarray:
        """``int32 [width]``: the sequence's pages, then ``NULL_PAGE`` (``None``: all null)."""
        width = self.max_pages_per_seq if width is None else width
        row = np.full((width,), NULL_PAGE, np.int32)
        if seq is not None:
            pages = self._pages[self._known(seq)]
            if len(pages) > width:
                raise ValueError(f"sequence {seq!r} has {len(pages)} pages, more than {width=}")
            row[: len(pages)] = pages
        return row

    def page_table(self, seqs: Sequence[Hashable | None], width: int | None = None) -> np.ndarray:
        """``int32 [B, width]``: one ``page_row`` per slot (``None`` for a free slot)."""
        return np.stack([self.page_row(s, width) for s in seqs])

    # -- updates ---------------------------------------------------------------------------
    def allocate(self, seq: Hashable, num_tokens: int) -> list[int]:
        """Pages for a new sequence of ``num_tokens`` tokens; returns them in order."""
        if seq in self._pages:
            raise ValueError(f"sequence {seq!r} is already allocated")
        self._pages[seq] = []
        self._tokens[seq] = 0
        try:
            return self.extend(seq, num_tokens)
        except (OutOfPages, ValueError):
            del self._pages[seq], self._tokens[seq]
            raise

    def extend(self, seq: Hashable, num_tokens: int) -> list[int]:
        """Grow ``seq`` to hold ``num_tokens`` tokens; returns the new pages (maybe none)."""
        pages = self._pages.get(seq)
        if pages is not None and 0 <= num_tokens <= len(pages) * self.page_size:
            self._tokens[seq] = max(self._tokens[seq], num_tokens)  # fast path: no new page
            return []
        self._known(seq)
        if num_tokens < 0:
            raise ValueError(f"num_tokens={num_tokens} must be >= 0")
        want = pages_for(num_tokens, self.page_size)
        if want > self.max_pages_per_seq:
            raise ValueError(
                f"num_tokens={num_tokens} needs {want} pages, more than "
                f"max_pages_per_seq={self.max_pages_per_seq}"
            )
        pages = self._pages[seq]
        need = want - len(pages)
        if need > len(self._free):
            raise OutOfPages(f"sequence {seq!r} needs {need} pages, {len(self._free)} are free")
        new = [self._free.pop() for _ in range(max(need, 0))]
        pages.extend(new)
        self._tokens[seq] = max(self._tokens[seq], num_tokens)
        return new

    def free(self, seq: Hashable) -> int:
        """Return every page of ``seq`` to the pool; returns how many."""
        pages = self._pages.pop(self._known(seq))
        del self._tokens[seq]
        self._free.extend(reversed(pages))
        return len(pages)

    # -- invariants ------------------------------------------------------------------------
    def check(self) -> None:
        """Raise ``RuntimeError`` naming the first broken invariant: no page in two
        sequences or both free and used, none leaked, the null page never handed out,
        free + used = capacity, each sequence sized to its tokens."""
        owner: dict[int, Hashable] = {}
        for seq, pages in self._pages.items():
            if len(pages) != pages_for(self._tokens[seq], self.page_size):
                raise RuntimeError(
                    f"sequence {seq!r} holds {len(pages)} pages for {self._tokens[seq]} tokens"
                )
            if len(pages) > self.max_pages_per_seq:
                raise RuntimeError(f"sequence {seq!r} holds {len(pages)} pages")
            for p in pages:
                if p in owner:
                    raise RuntimeError(f"page {p} belongs to {owner[p]!r} and {seq!r}")
                owner[p] = seq
        free = set(self._free)
        if len(free) != len(self._free):
            raise RuntimeError("a page is on the free list twice")
        if both := free & owner.keys():
            raise RuntimeError(f"pages {sorted(both)[:8]} are both free and used")
        valid = set(range(1, self.num_pages))
        if stray := (free | owner.keys()) - valid:
            raise RuntimeError(f"pages {sorted(stray)[:8]} are not allocatable page numbers")
        if leaked := valid - free - owner.keys():
            raise RuntimeError(f"pages {sorted(leaked)[:8]} are neither free nor used (leaked)")
        if len(free) + len(owner) != self.capacity:
            raise RuntimeError(f"free {len(free)} + used {len(owner)} != {self.capacity}")

    def _known(self, seq: Hashable) -> Hashable:
        if seq not in self._pages:
            raise ValueError(f"unknown sequence {seq!r}")
        return seq


def write_token(
    pages: Float[Array, "K A P H"],
    new: Float[Array, "B K H"],
    page_table: Int[Array, "B M"],
    positions: Int[Array, " B"],
) -> Float[Array, "K A P H"]:
    """The decode write: token ``positions[b]`` of every slot ``b`` gets ``new[b]``.

    A position past the page table (``>= M * P``) goes to ``NULL_PAGE``.  Jittable; in
    place when ``pages`` is donated.
    """
    p = pages.shape[2]
    b = jnp.arange(page_table.shape[0])
    page = page_table.at[b, positions // p].get(mode="fill", fill_value=NULL_PAGE)  # [B]
    return pages.at[:, page, positions % p].set(new.swapaxes(0, 1).astype(pages.dtype))


def write_prefix(
    pages: Float[Array, "K A P H"],
    new: Float[Array, "K T H"],
    page_row: Int[Array, " M"],
    start: Int[Array, ""] | int = 0,
) -> Float[Array, "K A P H"]:
    """The hand-off insert: tokens ``start .. start + T - 1`` of one sequence get ``new``.

    ``page_row`` is that sequence's page-table row.  Positions past its pages (the bucket
    padding of a prefill) go to ``NULL_PAGE``.  Jittable; in place when donated.
    """
    p = pages.shape[2]
    pos = start + jnp.arange(new.shape[1])  # [T]
    page = page_row.at[pos // p].get(mode="fill", fill_value=NULL_PAGE)  # [T]
    return pages.at[:, page, pos % p].set(new.astype(pages.dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """Per-layer page pools, the page table and the valid length of every slot."""

    k: tuple[jax.Array, ...]  # L x [K, A, P, H]
    v: tuple[jax.Array, ...]  # L x [K, A, P, H]
    page_table: Int[Array, "B M"]  # NULL_PAGE where a slot owns no page
    lengths: Int[Array, " B"]  # valid tokens per slot

    @classmethod
    def create(
        cls, cfg, batch: int, max_len: int, *, num_pages: int, page_size: int, dtype: str
    ) -> PagedKVCache:
        for name, v in (("batch", batch), ("max_len", max_len), ("page_size", page_size)):
            if v < 1:
                raise ValueError(f"paged cache needs {name} >= 1, got {name}={v}")
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages} must be >= 2 (page 0 is the null page)")
        shape = (cfg.n_kv_heads, num_pages, page_size, cfg.head_dim)
        zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
        return cls(
            k=zeros(),
            v=zeros(),
            page_table=jnp.full((batch, pages_for(max_len, page_size)), NULL_PAGE, jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[1]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]

    @property
    def max_pages_per_seq(self) -> int:
        return self.page_table.shape[1]

    @property
    def max_len(self) -> int:
        return self.max_pages_per_seq * self.page_size

    def allocator(self) -> PageAllocator:
        """A fresh host allocator for this cache's pool."""
        return PageAllocator(self.num_pages, self.page_size, self.max_pages_per_seq)

    def insert(self, prefix, slot, page_row: Int[Array, " M"]) -> PagedKVCache:
        """Write a batch-1 dense ``KVCache`` prefix into slot ``slot``'s pages ``page_row``
        (from ``PageAllocator.page_row``); sets the slot's page-table row and length.
        Jittable (``slot`` may be traced); the prefix's ``max_len`` may exceed its length
        (bucket padding), the padding goes to the slot's last page or to the null page."""
        if prefix.batch != 1 or len(prefix.k) != len(self.k):
            raise ValueError(
                f"insert needs a batch-1 cache of {len(self.k)} layers, got "
                f"batch={prefix.batch} with {len(prefix.k)} layers"
            )
        if page_row.shape != (self.max_pages_per_seq,):
            raise ValueError(
                f"page_row must be [{self.max_pages_per_seq}], got shape {page_row.shape}"
            )
        put = lambda pages, dense: write_prefix(pages, dense[0], page_row)  # dense [1, K, S, H]
        return PagedKVCache(
            k=tuple(map(put, self.k, prefix.k)),
            v=tuple(map(put, self.v, prefix.v)),
            page_table=self.page_table.at[slot].set(page_row.astype(jnp.int32)),
            lengths=self.lengths.at[slot].set(prefix.lengths[0]),
        )

    def release(self, slot) -> PagedKVCache:
        """Mark slot ``slot`` free: null page-table row, length 0 (its pages are not
        touched; free them in the allocator).  Jittable."""
        return dataclasses.replace(
            self,
            page_table=self.page_table.at[slot].set(NULL_PAGE),
            lengths=self.lengths.at[slot].set(0),
        )

    def read_prefix(self, slot, page_row: Int[Array, " M"], num_tokens: int) -> KVCache:
        """The inverse of ``insert``: positions ``0 .. num_tokens - 1`` of the sequence on
        pages ``page_row`` as a batch-1 dense ``KVCache`` (``[1, K, num_tokens, H]`` per
        layer, length ``lengths[slot]``).  Positions past the row's pages read the null page.
        Jittable with ``num_tokens`` static: preemption swaps a sequence out this way."""
        pos = jnp.arange(num_tokens)  # [T]
        page = page_row.at[pos // self.page_size].get(mode="fill", fill_value=NULL_PAGE)
        get = lambda pages: pages[:, page, pos % self.page_size][None]  # [1, K, T, H]
        return KVCache(
            k=tuple(map(get, self.k)),
            v=tuple(map(get, self.v)),
            lengths=self.lengths[slot][None],
        )
