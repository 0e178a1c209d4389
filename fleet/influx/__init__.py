"""The InfluxDB sink: every accepted reading becomes a point in InfluxDB (schema: `schema.py`).

Modules: `protocol` (line protocol, pure), `schema` (measurement and tags of a device), `queue`
(durable queue in the fleet database), `transport` (HTTP, v1 and v2), `writer` (batches, retries,
rejects), `sink` (the ingest hooks and the writer task), `check` (`campus-fleet influx check`),
`settings` (the `influx:` section). Nothing is imported here: the fleet config imports `settings`
for every command, and influxdb-client takes a while to import.
"""
