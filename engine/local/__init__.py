"""Local processes for `flashteam run`, the tests and the benchmarks: the launcher of a whole
local engine (``launcher``), a private redis-server or a 3-master Redis Cluster
(``redis_server``), a private PostgreSQL (``postgres``), and free loopback ports (``process``)."""
