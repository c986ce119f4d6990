"""Load rehearsal: record a tenant's traffic, replay it at any speed and scale, or generate
synthetic load, and report latency, throughput and errors (docs/operations.md).

Pure parts (traces, schedules, scenarios, reports) are plain functions; the engine
(asyncio + websockets), the recorder's Redis loop and the plot are the I/O edges. The
management commands `record_traffic`, `replay_load` and `loadgen` are thin over them.
"""
