"""The engine images' own process: the adapter agent beside each SGLang or llama.cpp engine."""
