"""Operator tools and the process launcher: ``tether certs``, ``tether demo``,
``tether connect`` and :mod:`tether.tools.launch`, which the demo, the tests
and the benchmarks use to start real broker and agent processes.

Nothing in the runtime (``protocol``, ``broker``, ``edge_agent``,
``tether.netio``, ``tether.settings``) imports this package.
"""
