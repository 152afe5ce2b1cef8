"""The fabric every service plugs into: wire contract, subjects, bus, telemetry, config."""
