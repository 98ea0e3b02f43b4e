"""HTTP routers, grouped by caller: webhook senders, API readers, health and metrics."""
