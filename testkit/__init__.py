"""What the test suite and the benchmarks share: real-server fixtures (a pytest plugin loaded by
``-p testkit.fixtures``), campaign and settings factories, and helpers that reach under the
engine. Not part of the installed package."""
