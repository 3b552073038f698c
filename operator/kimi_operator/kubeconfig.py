"""Credentials for the Kubernetes API, shared by the operator and its workload pods."""

from __future__ import annotations

import kubernetes


def load_client() -> kubernetes.client.ApiClient:
    """In-cluster credentials when running in a pod, else the current kubeconfig."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    return kubernetes.client.ApiClient()
