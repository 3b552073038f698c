"""The trainer image's workload: dataset check, LLaMA-Factory launch, progress, adapter export."""
