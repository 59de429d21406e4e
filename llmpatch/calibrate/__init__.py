"""Offline calibration: retrieval-head detection and the ACT head search. Each writes a plan (schema v1)."""
