"""Everything that touches Ray, files or users: datasets, ingest, fit, evaluate, tune, serve, report, CLI."""
