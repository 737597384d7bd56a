"""Integrations with training frameworks. Each module imports its framework itself, so importing this package
imports nothing heavy; use ``from resumekit.integrations.hf import ResumekitCallback``."""
