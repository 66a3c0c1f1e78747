"""HTTP routers of the ingest service, one module per resource."""
