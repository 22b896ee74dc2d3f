"""bbprobe agent: measures a broadband line and pushes results to a collector.

Nothing is imported eagerly here: the collector imports ``agent.schema`` and must not pull
in icmplib, aiohttp or scapy by doing so.
"""

__version__ = "0.1.0"
