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

import collections
import dataclasses
import hashlib
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


def block_keys(fingerprint: str, tokens: Sequence[int], page_size: int) -> list[bytes]:
    """Prefix-cache keys of the full ``page_size`` blocks of ``tokens``: key ``i`` is the
    sha256 of key ``i - 1`` (block 0: of ``fingerprint``, the prefill module's content hash)
    and block ``i``'s token ids.  A key names the K/V of one block as written by one prefill
    module after exactly the tokens before it; the partial last block gets no key.

        keys = block_keys(fingerprint(prefill_tree), prompt, page_size=16)
    """
    keys, prev = [], hashlib.sha256(fingerprint.encode()).digest()
    for i in range(len(tokens) // page_size):
        block = np.asarray(tokens[i * page_size : (i + 1) * page_size], np.int64)
        prev = hashlib.sha256(prev + block.tobytes()).digest()
        keys.append(prev)
    return keys


class PageAllocator:
    """Host-side free list of the pages ``1 .. num_pages - 1`` (page 0 is ``NULL_PAGE``),
    with reference counts and a prefix cache of full blocks.

    Sequences are named by any hashable id.  ``allocate`` / ``extend`` are all or nothing:
    they raise ``OutOfPages`` and change nothing when the pool is short.  Freed pages are
    reused first (LIFO).  ``check()`` verifies every invariant.

        alloc = PageAllocator(num_pages=1024, page_size=16, max_pages_per_seq=128)
        alloc.allocate("req-1", 40)       # 3 pages
        alloc.extend("req-1", 49)         # [page] : the 4th page
        row = alloc.page_row("req-1")     # int32 [128], padded with NULL_PAGE
        alloc.free("req-1")

    Prefix cache: ``cache_blocks(seq, keys)`` keeps the pages of ``seq``'s first full blocks
    under their ``block_keys`` (the cache holds one reference on each); ``lookup(keys)``
    returns the pages of the longest cached run of leading keys, which a new sequence then
    shares read-only (``allocate(seq, n, shared=pages)``).  A page is freed when its last
    reference goes (every sequence holding it freed, and evicted or ``clear_cache``d).
    Cached pages no sequence holds count as free: ``extend`` evicts them, least recently
    used first, when the free list runs short.
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
        self._refs: dict[int, int] = {}  # page -> references (sequences + the cache); >= 1
        self._cache: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # LRU first
        self._block: dict[int, tuple[bytes, int]] = {}  # cached page -> (key, block index)
        self._evictable = 0  # cached pages no sequence holds
        self.evictions = 0

    # -- queries ---------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Allocatable pages (all but the null page)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        """Pages an allocation can take: the free list plus unreferenced cached pages."""
        return len(self._free) + self._evictable

    @property
    def num_used(self) -> int:
        """Pages some sequence holds (a shared page counts once)."""
        return len(self._refs) - self._evictable

    @property
    def num_cached(self) -> int:
        """Pages the prefix cache holds (some may also be held by sequences)."""
        return len(self._cache)

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

    def cost(self, num_tokens: int, shared: Sequence[int] = ()) -> int:
        """How much ``num_free`` drops when a new sequence of ``num_tokens`` tokens starts on
        the cached pages ``shared``: its fresh pages, plus the shared ones nobody held."""
        pinned = sum(self._refs[p] == 1 for p in shared)
        return max(0, pages_for(num_tokens, self.page_size) - len(shared)) + pinned

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

    def peek(self, keys: Sequence[bytes]) -> list[int]:
        """The pages of the longest cached run of leading ``keys`` (nothing changes)."""
        pages = []
        for key in keys:
            if key not in self._cache:
                break
            pages.append(self._cache[key])
        return pages

    # -- updates ---------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The pages of the longest cached run of leading ``keys``, marked recently used
        (the first block most recently, so eviction takes a chain from its end)."""
        pages = self.peek(keys)
        for k in reversed(keys[: len(pages)]):
            self._cache.move_to_end(k)
        return pages

    def allocate(self, seq: Hashable, num_tokens: int, shared: Sequence[int] = ()) -> list[int]:
        """Pages for a new sequence of ``num_tokens`` tokens whose first pages are the
        cached pages ``shared`` (from ``lookup``, read-only); returns its new pages."""
        if seq in self._pages:
            raise ValueError(f"sequence {seq!r} is already allocated")
        for i, p in enumerate(shared):
            if self._block.get(p, (None, -1))[1] != i:
                raise ValueError(f"page {p} is not cached block {i}: it cannot be shared")
        if len(shared) * self.page_size > num_tokens:
            raise ValueError(f"{len(shared)} shared pages exceed num_tokens={num_tokens}")
        if self.cost(num_tokens, shared) > self.num_free:  # checked before any ref moves
            raise OutOfPages(f"sequence {seq!r} needs {self.cost(num_tokens, shared)} pages")
        self._pages[seq] = []
        self._tokens[seq] = 0
        for p in shared:
            self._ref(p)
            self._pages[seq].append(p)
        try:
            return self.extend(seq, num_tokens)
        except (OutOfPages, ValueError):
            self.free(seq)
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
        if need > self.num_free:
            raise OutOfPages(f"sequence {seq!r} needs {need} pages, {self.num_free} are free")
        self._evict(need - len(self._free))
        new = [self._free.pop() for _ in range(max(need, 0))]
        for p in new:
            self._ref(p)
        pages.extend(new)
        self._tokens[seq] = max(self._tokens[seq], num_tokens)
        return new

    def free(self, seq: Hashable) -> int:
        """Drop ``seq``'s reference on each of its pages (a page no one else holds returns
        to the pool; a cached one stays cached); returns how many pages it held."""
        pages = self._pages.pop(self._known(seq))
        del self._tokens[seq]
        for p in reversed(pages):
            self._unref(p)
        return len(pages)

    def cache_blocks(self, seq: Hashable, keys: Sequence[bytes]) -> int:
        """Keep ``seq``'s first ``len(keys)`` pages (full blocks it has written) in the prefix
        cache under ``keys``; returns how many were new (a key already cached keeps its page)."""
        pages = self._pages[self._known(seq)]
        if len(keys) * self.page_size > self._tokens[seq]:
            raise ValueError(f"{len(keys)} blocks exceed the {self._tokens[seq]} tokens of {seq!r}")
        new = 0
        for i, key in enumerate(keys):
            p = pages[i]
            if key in self._cache or p in self._block:
                continue
            self._ref(p)  # before it is a block: a held page gaining the cache's ref
            self._cache[key] = p
            self._block[p] = (key, i)
            new += 1
        for key in reversed(keys):  # most recently used, the first block most of all
            if key in self._cache:
                self._cache.move_to_end(key)
        return new

    def clear_cache(self) -> int:
        """Drop every cached block; returns how many (pages no sequence holds are freed)."""
        n = len(self._cache)
        for key, p in list(self._cache.items()):
            self._uncache(key, p)
        return n

    def _ref(self, p: int) -> None:
        self._refs[p] = self._refs.get(p, 0) + 1
        if p in self._block and self._refs[p] == 2:
            self._evictable -= 1

    def _unref(self, p: int) -> None:
        self._refs[p] -= 1
        if self._refs[p] == 0:
            del self._refs[p]
            self._free.append(p)
        elif p in self._block and self._refs[p] == 1:
            self._evictable += 1

    def _uncache(self, key: bytes, p: int) -> None:
        del self._cache[key], self._block[p]
        if self._refs[p] == 1:
            self._evictable -= 1
        self._refs[p] -= 1
        if self._refs[p] == 0:
            del self._refs[p]
            self._free.append(p)

    def _evict(self, n: int) -> None:
        """Free ``n`` cached pages no sequence holds, least recently used first."""
        if n <= 0:
            return
        victims = [(k, p) for k, p in self._cache.items() if self._refs[p] == 1][:n]
        for key, p in victims:
            self._uncache(key, p)
        self.evictions += len(victims)

    # -- invariants ------------------------------------------------------------------------
    def check(self) -> None:
        """Raise ``RuntimeError`` naming the first broken invariant: every page's reference
        count is the number of sequences holding it plus one if cached; a page held by two
        sequences is a cached full block at the same index in each; no page both free and
        referenced, none leaked, the null page never handed out; each sequence sized to its
        tokens; the cache's key and page maps agree."""
        refs: dict[int, int] = {}
        holders: dict[int, list[Hashable]] = {}
        for seq, pages in self._pages.items():
            if len(pages) != pages_for(self._tokens[seq], self.page_size):
                raise RuntimeError(
                    f"sequence {seq!r} holds {len(pages)} pages for {self._tokens[seq]} tokens"
                )
            if len(pages) > self.max_pages_per_seq:
                raise RuntimeError(f"sequence {seq!r} holds {len(pages)} pages")
            if len(set(pages)) != len(pages):
                raise RuntimeError(f"sequence {seq!r} holds a page twice: {pages}")
            for p in pages:
                refs[p] = refs.get(p, 0) + 1
                holders.setdefault(p, []).append(seq)
        if len(self._cache) != len(self._block):
            raise RuntimeError(f"{len(self._cache)} cache keys for {len(self._block)} pages")
        for key, p in self._cache.items():
            if self._block.get(p, (None,))[0] != key:
                raise RuntimeError(f"cache key of page {p} disagrees with its block record")
            refs[p] = refs.get(p, 0) + 1
        for p, seqs in holders.items():
            if len(seqs) > 1 or p in self._block:
                if p not in self._block:
                    raise RuntimeError(f"page {p} belongs to {seqs} and is not a cached block")
                i = self._block[p][1]
                for seq in seqs:
                    if self._pages[seq].index(p) != i:
                        raise RuntimeError(f"cached page {p} is not block {i} of {seq!r}")
                    if (i + 1) * self.page_size > self._tokens[seq]:
                        raise RuntimeError(f"cached page {p} is not a full block of {seq!r}")
        free = set(self._free)
        if len(free) != len(self._free):
            raise RuntimeError("a page is on the free list twice")
        if both := free & refs.keys():
            raise RuntimeError(f"pages {sorted(both)[:8]} are both free and used")
        valid = set(range(1, self.num_pages))
        if stray := (free | refs.keys()) - valid:
            raise RuntimeError(f"pages {sorted(stray)[:8]} are not allocatable page numbers")
        if leaked := valid - free - refs.keys():
            raise RuntimeError(f"pages {sorted(leaked)[:8]} are neither free nor used (leaked)")
        if refs != self._refs:
            pages = refs.keys() | self._refs.keys()
            bad = sorted(p for p in pages if refs.get(p) != self._refs.get(p))[:8]
            got, want = [self._refs.get(p, 0) for p in bad], [refs.get(p, 0) for p in bad]
            raise RuntimeError(f"reference counts of pages {bad} are {got}, expected {want}")
        evictable = sum(refs[p] == 1 for p in self._block)
        if evictable != self._evictable:
            raise RuntimeError(f"{evictable} evictable cached pages, counted {self._evictable}")
        if len(free) + len(refs) != self.capacity:
            raise RuntimeError(f"free {len(free)} + used {len(refs)} != {self.capacity}")

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

    def insert(
        self, prefix, slot, page_row: Int[Array, " M"], shared: Int[Array, ""] | int = 0
    ) -> PagedKVCache:
        """Write a batch-1 dense ``KVCache`` prefix into slot ``slot``'s pages ``page_row``
        (from ``PageAllocator.page_row``); sets the slot's page-table row and length.
        Jittable (``slot`` may be traced); the prefix's ``max_len`` may exceed its length
        (bucket padding), the padding goes to the slot's last page or to the null page.

        The first ``shared`` pages of the row are prefix-cache pages other sequences read:
        they are not written (their positions go to the null page), only pointed at."""
        if prefix.batch != 1 or len(prefix.k) != len(self.k):
            raise ValueError(
                f"insert needs a batch-1 cache of {len(self.k)} layers, got "
                f"batch={prefix.batch} with {len(prefix.k)} layers"
            )
        if page_row.shape != (self.max_pages_per_seq,):
            raise ValueError(
                f"page_row must be [{self.max_pages_per_seq}], got shape {page_row.shape}"
            )
        own = jnp.where(jnp.arange(page_row.shape[0]) < shared, NULL_PAGE, page_row)
        put = lambda pages, dense: write_prefix(pages, dense[0], own)  # dense [1, K, S, H]
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
