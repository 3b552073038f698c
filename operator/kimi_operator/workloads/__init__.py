"""What runs inside the operator's pods: prepare, dataset check, train launcher, router. Never
imports controller code; reports through exit codes, its own status fields and metrics."""
