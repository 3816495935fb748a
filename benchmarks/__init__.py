"""msg's benchmark suite: run ``python -m benchmarks.suite`` (see docs/benchmarks.md).

Modules:

- :mod:`benchmarks.suite`: the one command: starts every broker, runs every workload,
  writes JSON, a markdown report and charts.
- :mod:`benchmarks.loadgen`: the load generator, one process per measurement.
- :mod:`benchmarks.peers`: one minimal raw-socket driver per wire protocol (msg,
  Redis, NATS, MQTT 3.1.1, AMQP 0-9-1).
- :mod:`benchmarks.servers`: starting, pinning and measuring the brokers.
- :mod:`benchmarks.relay`: the reference relay, the CPython ceiling.
- :mod:`benchmarks.charts`: PNG charts from a results file.
"""
