"""Surgery: reduce experts and routers (in memory or streamed), stock export, per-layer budgets."""
