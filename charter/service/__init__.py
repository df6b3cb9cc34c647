"""The service layer: HTTP API, job store, worker, client and CLI. Never imports torch."""
