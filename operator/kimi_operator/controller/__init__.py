"""kopf handlers (thin), reconcile passes, the only Kubernetes API I/O of the operator, metrics."""
