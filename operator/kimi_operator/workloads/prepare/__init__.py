"""The prepare image's workload: download, verify and convert a KimiModel's weights on a node."""
