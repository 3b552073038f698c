"""The engine image's own process: the adapter agent beside each SGLang engine."""
