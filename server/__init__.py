"""janus-server's serving layer: settings, REST and gRPC frontends, job queues, workers, metrics, CLI."""
