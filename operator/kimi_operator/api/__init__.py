"""Pure data: the pydantic models of every kind's spec and status, conditions, CRD generation."""
