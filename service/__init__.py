"""Leadscore's shell: HTTP API, webhooks, storage, CLI. All I/O of the product lives here."""
