"""A private Redis Cluster for tests: the launcher the index benchmark uses too."""

from bench.redis_cluster import RedisClusterServer, redis_cluster

__all__ = ["RedisClusterServer", "redis_cluster"]
