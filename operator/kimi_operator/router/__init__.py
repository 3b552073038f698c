"""The OpenAI-compatible router in front of a LoraServer's engines (its own image). It imports only
``api``: pure name, routing, key and defaults logic here; the HTTP service comes on top of it."""
