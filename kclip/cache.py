"""The teacher embedding cache: one import path for its public names.

- ``kclip.embedding_cache``: the on-disk format (layout, Manifest, identity, shard and manifest writers,
  ``write_cache``) and the reader (``EmbeddingCache``, ``open_cache``, ``cache_is_complete``).
- ``kclip.cache_builder``: ``build_cache``, which runs the teacher over the captions (resumable, multi-rank).
"""
from kclip.cache_builder import build_cache
from kclip.embedding_cache import (EXPECT_FIELDS, TEACHER_FIELDS, CacheCorruptError, CacheMismatchError, EmbeddingCache,
                                   Manifest, cache_is_complete, captions_sha256, expected_fields, open_cache,
                                   teacher_fields, write_cache)

__all__ = ["Manifest", "EmbeddingCache", "CacheMismatchError", "CacheCorruptError", "build_cache", "open_cache",
           "cache_is_complete", "captions_sha256", "expected_fields", "teacher_fields", "write_cache", "EXPECT_FIELDS",
           "TEACHER_FIELDS"]
