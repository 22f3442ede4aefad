"""Foundations with no knowledge of models or unlearning: one-line errors, files written atomically, the settings
check, the component registry, interrupt handling."""
