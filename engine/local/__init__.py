"""Local processes for `flashteam run`, the tests and the benchmarks: a private redis-server (or a
3-master Redis Cluster), a private PostgreSQL, and free loopback ports for them."""
