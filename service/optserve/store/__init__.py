"""State in Redis: the session layout, the versioned commit, the lock, idempotency records."""
