"""Training stages: one small class per stage kind, implementing the Stage protocol (see base.py)."""
