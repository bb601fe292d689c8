"""HTTP routes: thin, over the engine and the store."""
