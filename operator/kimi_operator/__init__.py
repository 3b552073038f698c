"""kimi-operator: fine-tune and serve Kimi K2.5 on Kubernetes."""

__version__ = "0.1.0"
